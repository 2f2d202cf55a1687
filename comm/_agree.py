"""Agreeing on a failure: a step that can fail on one rank, followed by collectives, must first tell
every rank whether it failed anywhere. Otherwise the failing rank raises while the others enter the
next collective and wait there until the process group's timeout.

One all_reduce(SUM) of an int32 vector with one slot per rank: each rank sets its own slot, so every
rank learns WHICH ranks failed (for the error message), at the cost of world_size * 4 bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["failed_ranks", "run_collectively"]

T = TypeVar("T")


def failed_ranks(failed: bool, *, device: torch.device, group: dist.ProcessGroup | None = None) -> list[int]:
    """Collective (every rank of ``group`` must call it): the ranks, ascending, whose ``failed`` was True."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    flags = torch.zeros(world_size, dtype=torch.int32, device=device)
    flags[rank] = int(failed)
    dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=group)
    return [r for r, f in enumerate(flags.tolist()) if f]


def run_collectively(what: str, fn: Callable[[], T], *, device: torch.device,
                     group: dist.ProcessGroup | None = None) -> T:
    """``fn()`` on every rank, then agree on the outcome (``failed_ranks``): if it raised anywhere it
    raises everywhere -- the failing rank(s) their own exception, the others a RuntimeError naming
    ``what`` and the failing ranks -- so that no rank goes on alone into a later collective."""
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # re-raised below, once the other ranks have heard of it
        error = e
    ranks = failed_ranks(error is not None, device=device, group=group)
    if error is not None:
        raise error
    if ranks:
        raise RuntimeError(f"{what} failed on rank(s) {ranks}; see their errors")
    return result  # type: ignore[return-value]  # fn() returned normally
