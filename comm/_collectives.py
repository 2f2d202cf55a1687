"""The three stock collectives the FP8 all-reduce is built from, each counted into ``CommStats``.

FP8 travels as uint8 views: torch.distributed refuses float8 dtypes, and a byte copy is lossless.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fp8train.comm.stats import CommStats

__all__ = ["Collectives"]


class Collectives:
    """Collectives on ``group`` (None: the default group) that add their traffic to ``stats``."""

    def __init__(self, group: dist.ProcessGroup | None, stats: CommStats) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.stats = stats

    def all_reduce_max_(self, x: torch.Tensor) -> None:
        """In-place elementwise MAX over ranks (the amax sync)."""
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        ring = 2 * (self.world_size - 1) * x.nbytes // self.world_size
        self._count(ring, ring)
        self.stats.amax_syncs += 1

    def all_to_all_(self, out_u8: torch.Tensor, in_u8: torch.Tensor, out_splits: list[int],
                    in_splits: list[int]) -> None:
        """Rank r sends in_u8's r'-th split to rank r' and receives every rank's r-th split."""
        dist.all_to_all_single(out_u8, in_u8, out_splits, in_splits, group=self.group)
        self._count(sum(in_splits) - in_splits[self.rank], sum(out_splits) - out_splits[self.rank])

    def all_gather_(self, out_u8: torch.Tensor, in_u8: torch.Tensor) -> None:
        """out_u8 = concatenation of every rank's equally sized in_u8, in rank order."""
        # all_gather_single is the newer name (torch >= 2.12); all_gather_into_tensor before it
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out_u8, in_u8, group=self.group)
        others = (self.world_size - 1) * in_u8.nbytes
        self._count(others, others)

    def _count(self, sent: int, received: int) -> None:
        self.stats.collectives += 1
        self.stats.bytes_sent += sent
        self.stats.bytes_received += received
