"""Whole-tensor partitioning for ZeRO (docs/design.md): each parameter, with its FP8 data and scales, is
owned by exactly one rank.

Longest-processing-time greedy: parameters sorted by (numel descending, index ascending), each given
to the least-loaded rank, ties to the lowest rank. A pure function of the parameter sizes and the
world size, so every rank computes the same partition with no communication. LPT's makespan is at
most 4/3 of the optimum; on transformer-shaped models (many equal-sized matrices) it is near-perfect.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from fp8train._validate import check_int_range

__all__ = ["Partition", "partition_parameters"]


@dataclass(frozen=True, slots=True)
class Partition:
    """owner[i]: the rank that owns parameter i; loads[r]: elements owned by rank r."""

    owner: tuple[int, ...]
    loads: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return len(self.loads)

    @property
    def balance(self) -> float:
        """max load / mean load (1.0 is perfect; 0 parameters count as balanced)."""
        total = sum(self.loads)
        return max(self.loads) * self.world_size / total if total else 1.0

    def owned_by(self, rank: int) -> list[int]:
        """Indices of the parameters rank ``rank`` owns, ascending."""
        return [i for i, r in enumerate(self.owner) if r == rank]

    def describe(self) -> str:
        """One line for logs: per-rank load in elements and the balance."""
        loads = ", ".join(f"rank {r}: {n:,}" for r, n in enumerate(self.loads))
        return f"whole-tensor partition over {self.world_size} ranks ({loads}); max/mean {self.balance:.4f}"


def partition_parameters(numels: Sequence[int], world_size: int) -> Partition:
    """LPT partition of tensors with the given element counts over ``world_size`` ranks."""
    check_int_range("partition_parameters", "world_size", world_size, 1)
    for i, n in enumerate(numels):
        check_int_range("partition_parameters", f"numels[{i}]", n, 0)
    heap = [(0, rank) for rank in range(world_size)]  # (load, rank): the min is least loaded, then lowest rank
    owner = [0] * len(numels)
    loads = [0] * world_size
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        load, rank = heapq.heappop(heap)
        owner[i] = rank
        loads[rank] = load + numels[i]
        heapq.heappush(heap, (loads[rank], rank))
    return Partition(owner=tuple(owner), loads=tuple(loads))
