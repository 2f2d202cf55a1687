"""Where each tensor of a bucket lies in the flat FP8 payload, and which elements each rank reduces.

All positions are element indices (one FP8 element = one byte on the wire).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["FlatLayout", "plan_buckets", "uniform_bounds"]


@dataclass(frozen=True, slots=True)
class FlatLayout:
    """Tensors laid end to end: tensor i occupies [offsets[i], offsets[i] + numels[i])."""

    offsets: tuple[int, ...]
    numels: tuple[int, ...]

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> FlatLayout:
        offsets, pos = [], 0
        for t in tensors:
            offsets.append(pos)
            pos += t.numel()
        return cls(offsets=tuple(offsets), numels=tuple(t.numel() for t in tensors))

    @property
    def numel(self) -> int:
        return self.offsets[-1] + self.numels[-1] if self.offsets else 0

    def segments(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(tensor index, flat start, flat stop) of every tensor's overlap with [start, stop)."""
        out = []
        for i, (off, n) in enumerate(zip(self.offsets, self.numels)):
            lo, hi = max(off, start), min(off + n, stop)
            if lo < hi:
                out.append((i, lo, hi))
        return out

    def owner_bounds(self, owner_of_tensor: Sequence[int], world_size: int) -> list[int] | None:
        """Rank boundaries when tensors are ordered by owner (rank r reduces [b[r], b[r+1])); None if
        the tensors are not grouped by ascending owner, i.e. no contiguous owner-aligned split exists."""
        if list(owner_of_tensor) != sorted(owner_of_tensor):
            return None
        bounds = [0] * (world_size + 1)
        for owner, n in zip(owner_of_tensor, self.numels):
            bounds[owner + 1] += n
        for r in range(world_size):
            bounds[r + 1] += bounds[r]
        return bounds


def uniform_bounds(numel: int, world_size: int) -> list[int]:
    """Equal chunks of ceil(numel / world_size) elements (the last ones shorter or empty)."""
    chunk = -(-numel // world_size)
    return [min(r * chunk, numel) for r in range(world_size + 1)]


def plan_buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Consecutive tensors grouped so that each bucket holds at most ``bucket_bytes`` of gradient
    bytes (each tensor counted in its own dtype); a tensor larger than the budget gets a bucket of its
    own. Empty tensors are left out (nothing to send)."""
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            continue
        if current and filled + nbytes > bucket_bytes:
            buckets.append(current)
            current, filled = [], 0
        current.append(i)
        filled += nbytes
    if current:
        buckets.append(current)
    return buckets
