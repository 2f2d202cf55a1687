"""The stock torch.distributed operations the FP8 all-reduce is built from, each counted into
``CommStats``.

FP8 travels as uint8 views: torch.distributed refuses float8 dtypes, and a byte copy is lossless.
The chunk exchanges (all-to-all, all-gather) run either as the collectives themselves or as batched
isend/irecv to every peer (``Fp8CommConfig.exchange``); both move the same bytes.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from fp8train.comm.stats import CommStats

__all__ = ["Collectives"]

# Default size of p2p pieces (Fp8CommConfig.p2p_piece_bytes): all posted at once (distinct tags),
# each send next to the matching receive. Measured on a 1 Gbit/s link with 32 MB each way: one message
# per direction took 0.28 s or 0.56 s from call to call; all sends posted before all receives, the
# same; pieces interleaved send/receive: 0.29-0.32 s every time (line rate).
P2P_PIECE_BYTES = 4 * 2**20


class Collectives:
    """Operations on ``group`` (None: the default group) that add their traffic to ``stats``.
    exchange: "collective" | "p2p" | "auto" (p2p on gloo, where its collectives run at about half the
    link rate; collective elsewhere)."""

    def __init__(self, group: dist.ProcessGroup | None, stats: CommStats, exchange: str = "auto",
                 piece_bytes: int = P2P_PIECE_BYTES) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.stats = stats
        if exchange == "auto":
            exchange = "p2p" if dist.get_backend(group) == dist.Backend.GLOO else "collective"
        self.p2p = exchange == "p2p"
        self.piece_bytes = piece_bytes

    def all_reduce_max_(self, x: torch.Tensor) -> None:
        """In-place elementwise MAX over ranks (the amax sync)."""
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        ring = 2 * (self.world_size - 1) * x.nbytes // self.world_size
        self._count(ring, ring)
        self.stats.amax_syncs += 1

    def all_to_all_(self, out_u8: torch.Tensor, in_u8: torch.Tensor, out_splits: list[int],
                    in_splits: list[int]) -> None:
        """Rank r sends in_u8's r'-th split to rank r' and receives every rank's r-th split."""
        if self.p2p:
            ins, outs = in_u8.split(in_splits), out_u8.split(out_splits)
            outs[self.rank].copy_(ins[self.rank])
            self._exchange([(r, ins[r]) for r in self.peers()], [(r, outs[r]) for r in self.peers()])
        else:
            dist.all_to_all_single(out_u8, in_u8, out_splits, in_splits, group=self.group)
        self._count(sum(in_splits) - in_splits[self.rank], sum(out_splits) - out_splits[self.rank])

    def all_gather_(self, out_u8: torch.Tensor, in_u8: torch.Tensor) -> None:
        """out_u8 = concatenation of every rank's equally sized in_u8, in rank order."""
        if self.p2p:
            outs = out_u8.split(in_u8.numel())
            outs[self.rank].copy_(in_u8)
            self._exchange([(r, in_u8) for r in self.peers()], [(r, outs[r]) for r in self.peers()])
        else:
            # all_gather_single is the newer name (torch >= 2.12); all_gather_into_tensor before it
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            gather(out_u8, in_u8, group=self.group)
        others = (self.world_size - 1) * in_u8.nbytes
        self._count(others, others)

    def peers(self) -> list[int]:
        """The other ranks, starting after this one (r+1, r+2, ... cyclically): every rank talks to a
        different peer first."""
        return [(self.rank + k) % self.world_size for k in range(1, self.world_size)]

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def post_send(self, t: torch.Tensor, dst: int, tag: int) -> dist.Work:
        """Asynchronous send of a uint8 piece (for pipelined exchanges); bytes are counted, the
        exchange it belongs to is counted once with ``count_exchange``."""
        self.stats.bytes_sent += t.nbytes
        return dist.isend(t, self._global(dst), group=self.group, tag=tag)

    def post_recv(self, t: torch.Tensor, src: int, tag: int) -> dist.Work:
        self.stats.bytes_received += t.nbytes
        return dist.irecv(t, self._global(src), group=self.group, tag=tag)

    def count_exchange(self) -> None:
        self.stats.collectives += 1

    def _exchange(self, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]]) -> None:
        """All sends and receives posted at once (full duplex to every peer), in pieces, then awaited."""
        def pieces(op: object, r: int, t: torch.Tensor) -> list[dist.P2POp]:
            return [dist.P2POp(op, piece, self._global(r), self.group, tag)
                    for tag, piece in enumerate(t.split(self.piece_bytes)) if piece.numel()]

        ops = []
        for (dst, t_send), (src, t_recv) in zip(sends, recvs):  # send piece i, receive piece i, ...
            for pair in itertools.zip_longest(pieces(dist.isend, dst, t_send), pieces(dist.irecv, src, t_recv)):
                ops += [op for op in pair if op is not None]
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()

    def _count(self, sent: int, received: int) -> None:
        self.stats.collectives += 1
        self.stats.bytes_sent += sent
        self.stats.bytes_received += received
