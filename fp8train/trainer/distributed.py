"""Joining the job: ranks from the launcher's environment, the device, the process group.

Every run has a process group, even a single process (a one-rank gloo/nccl group on an in-memory
store), so that one code path serves 1 and N processes: DDP, the FP8 gradient all-reduce and ZeRO
do at N = 1 exactly the quantization they do at N.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fp8train.comm._agree import failed_ranks
from fp8train.errors import ConfigError
from fp8train.trainer.config import LauncherConfig

__all__ = ["DistEnv", "agree", "broadcast_object", "distributed_session"]


@dataclass(frozen=True, slots=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ConfigError(f"launcher: environment variable {name} is not set; the launcher must export it")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"launcher: environment variable {name}={raw!r} is not an integer") from None


def _ranks(cfg: LauncherConfig) -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun's or SLURM's variables."""
    if cfg.env == "slurm":
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ConfigError(f"launcher.env='slurm' needs {name} exported by the batch script (see launch/slurm.sbatch)")
        world = _env_int("SLURM_NTASKS")
        nodes = _env_int("SLURM_NNODES", 1)
        return _env_int("SLURM_PROCID"), world, _env_int("SLURM_LOCALID"), max(1, world // nodes)
    world = _env_int("WORLD_SIZE", 1)
    local_world = _env_int("LOCAL_WORLD_SIZE", _env_int("LOCAL_SIZE", world))  # LOCAL_SIZE: the DeepSpeed launcher's
    return _env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0), local_world


def _device(cfg: LauncherConfig, local_rank: int) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("launcher.device='cuda' but CUDA is not available here; allowed: 'auto', 'cpu'")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@contextmanager
def distributed_session(cfg: LauncherConfig) -> Iterator[DistEnv]:
    """Join (or reuse) the default process group for the duration of a run. A group that already
    exists is used as it is and left open; one created here is destroyed on exit."""
    rank, world, local_rank, local_world = _ranks(cfg)
    device = _device(cfg, local_rank)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("launcher.backend='nccl' needs launcher.device cuda; allowed on CPU: 'auto', 'gloo'")
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and (cfg.cpu_threads is not None or local_world > 1):
        # N processes on one host share its cores: without this each would start cores threads
        torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 1) // local_world))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, store=_attempt_store(rank, world, timeout), rank=rank,
                                    world_size=world, timeout=timeout)
            # A launcher's group lives as long as the process: a second env:// init on the same
            # store (the next run of a Hydra sweep under torchrun) would never rendezvous. Later
            # runs in this process reuse it; it is destroyed at exit.
            atexit.register(_destroy_if_initialized)
            created = False
    else:
        rank, world = dist.get_rank(), dist.get_world_size()
    try:
        yield DistEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world, device=device)
    finally:
        torch.set_num_threads(threads_before)  # train() called from Python leaves the caller's setting
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The env:// store (MASTER_ADDR:MASTER_PORT); under torchrun's shared agent store, with a
    prefix per restart attempt.

    By default torchrun's agents share their rendezvous TCPStore with the workers
    (TORCHELASTIC_USE_AGENT_STORE=True), and that store outlives a restart (``--max-restarts``):
    the new workers would meet among the dead attempt's keys -- among them the gloo addresses of
    processes that no longer exist -- and fail to connect ("Connection refused"). A prefix per
    attempt (TORCHELASTIC_RESTART_COUNT) gives every attempt fresh keys; it assumes that every
    agent restarted as often (one node, or all nodes restarting together).

    With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/multi_node.sh sets it) rank 0 hosts a new
    store at a new port each rendezvous round, so there are no stale keys and no prefix: a node that
    died and was started again (restart count 0) meets survivors whose count is 1 (launch/README.md)."""
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), _env_int("MASTER_PORT")
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, world, is_master=not agent_hosts_store and rank == 0, timeout=timeout,
                          multi_tenant=not agent_hosts_store)
    if not agent_hosts_store:
        return store
    return dist.PrefixStore(f"fp8train/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _destroy_if_initialized() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def agree(ok: bool, what: str, device: torch.device) -> None:
    """Collective: if ``ok`` is False on any rank, every rank whose ``ok`` is True raises a
    RuntimeError naming the failing ranks, so that no rank waits alone in a later collective. Call
    it in a ``finally`` after the work that may fail: a failing rank's own error is in flight there
    and is the one that propagates. (To run a function and agree on its outcome:
    ``fp8train.comm._agree.run_collectively``.)"""
    if (ranks := failed_ranks(not ok, device=device)) and ok:
        raise RuntimeError(f"{what} failed on rank(s) {ranks}; see their errors")


def broadcast_object(obj: object, device: torch.device) -> object:
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]
