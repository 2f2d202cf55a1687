"""Run a function on N local gloo processes (tests, benchmarks): spawn, file:// rendezvous in a temp
dir (no fixed port), a timeout that kills stragglers, and the workers' return values (or their
tracebacks) back in the calling process."""

from __future__ import annotations

import datetime
import io
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


__all__ = ["run_on_gloo"]


def _entry(rank: int, world_size: int, init_file: str, fn: Callable[..., Any], args: tuple[Any, ...],
           results: Any, threads: int, collective_timeout_s: float) -> None:
    torch.set_num_threads(threads)  # N processes share the machine's cores
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout_s))
        out = fn(rank, world_size, *args)
        buf = io.BytesIO()  # plain bytes: tensors shared by file descriptor die with their process
        torch.save(out, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report everything: a silent worker would look like a hang
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_gloo(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0, threads: int = 1,
                collective_timeout_s: float = 60.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` processes; returns the results in rank order.
    ``fn`` must be a module-level function (it is pickled by name into spawned processes).
    timeout_s: for each result to arrive; collective_timeout_s: the process group's timeout."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(r, world_size, init_file, fn, args, results, threads, collective_timeout_s),
                             daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        collected: dict[int, Any] = {}
        try:
            for _ in range(world_size):
                rank, status, out = results.get(timeout=timeout_s)
                if status != "ok":
                    raise AssertionError(f"rank {rank} failed:\n{out}")
                collected[rank] = torch.load(io.BytesIO(out), weights_only=False)
        except queue.Empty:
            raise AssertionError(f"workers timed out after {timeout_s} s (ranks done: {sorted(collected)})") from None
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return [collected[r] for r in range(world_size)]
