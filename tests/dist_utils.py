"""Run a function on N gloo processes under pytest: spawn, file:// rendezvous in a temp dir (no
fixed port), a timeout that kills stragglers, and the workers' return values (or their tracebacks)
back in the test process."""

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


def _entry(rank: int, world_size: int, init_file: str, fn: Callable[..., Any], args: tuple[Any, ...],
           results: Any) -> None:
    torch.set_num_threads(1)  # N processes share 2 cores
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        out = fn(rank, world_size, *args)
        buf = io.BytesIO()  # plain bytes: tensors shared by file descriptor die with their process
        torch.save(out, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report everything: a silent worker would look like a hang
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` processes; returns the results in rank order.
    ``fn`` must be a module-level function (it is pickled by name into spawned processes)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(r, world_size, init_file, fn, args, results), daemon=True)
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
