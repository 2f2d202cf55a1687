"""The FP8 all-reduce of one bucket with its compute overlapped with the wire (point-to-point
exchange, ``Fp8CommConfig.exchange`` = "p2p" or "auto" on gloo).

Same algorithm, same bits as the unpipelined path in ``allreduce.py`` (steps 4-6 there): only the
order of work changes. Every chunk travels in pieces of ``Fp8CommConfig.p2p_piece_bytes``:
  1. receives are posted first: this rank's region from every peer (reduce-scatter), every peer's
     region of the mean (all-gather);
  2. pieces are quantized destination by destination (peers first, starting after this rank, so
     ranks do not all feed the same peer), each sent as soon as it is quantized;
  3. for each piece of this rank's region, once every peer's copy has landed: sum in rank order,
     divide by N, requantize, send to every peer -- while later pieces are still on the wire;
  4. this rank's own region is decoded into the gradients while the peers' pieces arrive, then each
     peer piece is decoded as it lands.
On a link where the wire dominates, quantize, decode-sum and decode mostly hide behind it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from fp8train._decode_cpu import mean_of_fp8_rows
from fp8train.cast import cast_to_fp8
from fp8train.comm._codec import BucketCodec
from fp8train.comm._collectives import Collectives
from fp8train.comm._layout import FlatLayout, uniform_bounds
from fp8train.comm.stats import CommStats
from fp8train.formats import Fp8Format

__all__ = ["pipelined_all_reduce_"]

_GATHER_TAG = 1 << 20  # all-gather pieces use tags from here; reduce-scatter pieces from 0


def _pieces(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, stop)) for a in range(start, stop, size)]


def pipelined_all_reduce_(grads: Sequence[torch.Tensor], layout: FlatLayout, log2_scale: torch.Tensor,
                          fmt: Fp8Format, coll: Collectives, stats: CommStats, quant_stats: bool) -> None:
    """Steps 4-6 of the FP8 all-reduce for one bucket whose scales are agreed (``log2_scale``)."""
    device, me, world = grads[0].device, coll.rank, coll.world_size
    bounds = uniform_bounds(layout.numel, world)
    bucket = BucketCodec(grads, layout, log2_scale, fmt)
    lo, hi = bounds[me], bounds[me + 1]
    my_pieces = _pieces(lo, hi, coll.piece_bytes)
    # rows[p]: (world, piece length) codes of my piece p, one row per rank (own row filled locally)
    rows = [torch.empty(world, b - a, dtype=torch.uint8, device=device) for a, b in my_pieces]
    gathered = torch.empty(layout.numel, dtype=torch.uint8, device=device)
    rs_recv = {q: [coll.post_recv(rows[p][q], q, p) for p in range(len(my_pieces))] for q in coll.peers()}
    ag_recv = {q: [(a, b, coll.post_recv(gathered[a:b], q, _GATHER_TAG + p)) for p, (a, b) in
                   enumerate(_pieces(bounds[q], bounds[q + 1], coll.piece_bytes))] for q in coll.peers()}
    sends: list[dist.Work] = []
    payload = torch.empty(layout.numel, dtype=torch.uint8, device=device)
    for q in coll.peers():  # quantize piece by piece, each sent as soon as it is quantized
        for p, (a, b) in enumerate(_pieces(bounds[q], bounds[q + 1], coll.piece_bytes)):
            bucket.quantize(a, b, payload[a:b], quant_stats)
            sends.append(coll.post_send(payload[a:b], q, p))
    for p, (a, b) in enumerate(my_pieces):
        bucket.quantize(a, b, rows[p][me], quant_stats)
    coll.count_exchange()
    one = torch.ones((), dtype=torch.float32, device=device)  # same scale: the mean is already scaled
    for p, (a, b) in enumerate(my_pieces):
        for q in coll.peers():
            rs_recv[q][p].wait()
        mean_scaled = mean_of_fp8_rows(rows[p], fmt)  # rank order 0..N-1 (row index = rank)
        cast_to_fp8(mean_scaled, one, fmt, out=gathered[a:b].view(fmt.dtype))
        sends += [coll.post_send(gathered[a:b], q, _GATHER_TAG + p) for q in coll.peers()]
    coll.count_exchange()
    bucket.decode(lo, gathered[lo:hi])
    for q in coll.peers():
        for a, b, work in ag_recv[q]:
            work.wait()
            bucket.decode(a, gathered[a:b])
    for work in sends:
        work.wait()
    bucket.finish()
    if quant_stats:
        stats.saturated, stats.underflowed = bucket.saturated, bucket.underflowed
