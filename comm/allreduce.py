"""FP8 gradient all-reduce with a globally-synced scale, built from stock collectives (docs/design.md).

One bucket of n gradient tensors on N ranks:
  1. local amax of every tensor, NaN -> inf so MAX cannot drop it;
  2. ONE all_reduce(MAX) of the n-vector: the global amax, identical on every rank;
  3. a shared power-of-two scale per tensor, ``amax_to_log2_scale`` (global amax just under the
     format's max, minus ``margin``): no rank can saturate, and scaling is exact;
  4. quantize into one flat FP8 payload (tensors end to end);
  5. reduce-scatter as all_to_all_single on uint8 views: rank r receives every rank's copy of its
     chunk, decodes to fp32 and sums them in rank order 0..N-1 (one fixed order: deterministic),
     then divides by N (``fp8train._decode_cpu``: one fused loop on CPU). The sum stays in scaled units: |sum| <= N * fmax, far from fp32 overflow;
  6. all-reduce only: requantize the mean with the SAME scale (|mean| <= global amax, so it fits
     and needs no second sync) and all_gather the uint8 chunks; every rank decodes the same bytes,
     so every rank ends with bit-identical gradients. The decode saturates to +-max of the
     gradient's dtype: E4M3 rounding can push a finite mean past it (fp16 64000 -> 65536), and an
     inf written there would be an overflow that ``found_inf`` never reported (_decode_cpu.py).
Wire: (N-1)/N bytes per element out in step 5 and again in step 6 = 2(N-1)/N, a quarter of an fp32
ring all-reduce (8(N-1)/N), plus 2(N-1)/N * 4n bytes of amax.

Overflow: an inf/NaN gradient anywhere makes that tensor's global amax inf on every rank after step
2, so all ranks agree on it without another collective (the fp32 sum itself cannot overflow, see
step 5). Such a bucket is not sent at all: its gradients are left as they were and ``found_inf`` is
set; the caller skips the optimizer step.

Error bound (per element, against the exact mean m of the inputs x_1..x_N, with s the shared scale,
q the format's relative rounding error 2**-(mantissa_bits + 1) and d half its smallest subnormal):
  |out - m| <= (q * mean_i |x_i| + d / s) + (q * |m~| + d / s)
where m~ is the fp32 mean of the decoded inputs: each input is rounded once (step 4) and the mean once
more (step 6). The fp32 sum and the division by N add at most about N * 2**-24 relative, negligible
beside q (2**-4 for e4m3). The reduce-scatter alone carries only the first term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from fp8train._decode_cpu import mean_of_fp8_rows
from fp8train.cast import cast_to_fp8
from fp8train.comm._codec import BucketCodec
from fp8train.comm._collectives import Collectives
from fp8train.comm._layout import FlatLayout, plan_buckets, uniform_bounds
from fp8train.comm._pipeline import pipelined_all_reduce_
from fp8train.comm.config import Fp8CommConfig
from fp8train.comm.stats import CommStats
from fp8train.formats import Fp8Format
from fp8train.scaling import amax_to_log2_scale, tensor_to_amax

__all__ = ["fp8_all_reduce_", "fp8_reduce_scatter", "synced_grad_amax"]


def _check_grads(grads: Sequence[torch.Tensor]) -> None:
    if not grads:
        return
    device = grads[0].device
    for i, g in enumerate(grads):
        if not g.is_floating_point() or g.element_size() < 2:
            raise ValueError(f"fp8train.comm: gradient {i} has dtype {g.dtype}; allowed: float32, bfloat16, float16")
        if g.device != device:
            raise ValueError(f"fp8train.comm: gradient {i} is on {g.device}, gradient 0 on {device}; "
                             "a bucket must live on one device")


def _sync_log2_scales(grads: Sequence[torch.Tensor], fmt: Fp8Format, margin: int, coll: Collectives,
                      scale_groups: Sequence[int] | None = None) -> tuple[torch.Tensor, bool, torch.Tensor]:
    """Steps 1-3: shared scaling biases (n,), whether any rank holds an inf/NaN gradient, and the
    global amax (n,) each bias came from.
    ``scale_groups``: (n,) group index of each tensor; tensors of one group share one scale, from the
    largest amax among them (e.g. the per-rank pieces of one parameter)."""
    # per-tensor aminmax, not _foreach_norm(ord=inf): the latter runs at ~2 GB/s on CPU, aminmax at
    # memory bandwidth (64M fp32: 139 ms vs 16 ms here); both propagate NaN and inf
    amax = torch.stack([tensor_to_amax(g) for g in grads])
    amax = torch.where(torch.isnan(amax), torch.full_like(amax, float("inf")), amax)
    coll.all_reduce_max_(amax)
    if scale_groups is not None:
        index = torch.as_tensor(scale_groups, dtype=torch.int64, device=amax.device)
        group_amax = torch.zeros(int(index.max()) + 1 if len(index) else 0, dtype=amax.dtype, device=amax.device)
        amax = group_amax.scatter_reduce_(0, index, amax, reduce="amax")[index]
    found_inf = not bool(torch.isfinite(amax).all())  # the one host read of the bucket's amax
    return amax_to_log2_scale(amax, fmt, margin=margin), found_inf, amax


def synced_grad_amax(log2_scale: torch.Tensor, fmt: Fp8Format, grads: Sequence[torch.Tensor],
                     amax: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) fp32 upper bounds of max |g| of the gradients this module writes, known without reading them:
    from the shared scale s and the global amax A of what the ranks sent (MAX-reduced, step 2),
    min(fmt.max, A s (1 + e)**2 + 3 d) * 2**-s, capped at the max of each gradient's dtype.

    Why it bounds them (e = 2**-(mantissa_bits + 1), round-to-nearest's relative error; d = half the
    format's smallest subnormal, its absolute error there): a quantized input is at most
    A s (1 + e) + d, and never above fmt.max (saturation); the mean of N of them is at most the
    largest (each partial sum of values <= Q is at most k Q, which fp32 holds exactly for these codes,
    rounding is monotone, and N Q / N is exact); the requantized mean adds one more rounding,
    (A s (1 + e) + d)(1 + e) + d <= A s (1 + e)**2 + 3 d; times scale_inv (a power of two) is exact
    or smaller; the decode clamps to the dtype's max. Formed in float64, widened by 2**-20 and
    rounded up to fp32: a margin for any other summation order. It is about 1.13 A for e4m3 (1.27 for
    e5m2); without ``amax``, fmt.max * 2**-s alone (up to 2**(1 + margin) A)."""
    s = log2_scale.to(torch.float64)
    bound = torch.full_like(s, fmt.max)
    if amax is not None:
        e, d = 2.0 ** -(fmt.mantissa_bits + 1), 0.5 * fmt.min_subnormal
        bound = torch.minimum(bound, amax.to(torch.float64) * torch.exp2(s) * (1.0 + e) ** 2 + 3.0 * d)
    bound = (bound * torch.exp2(-s)) * (1.0 + 2.0**-20)
    bound = torch.nextafter(bound.to(torch.float32), torch.tensor(float("inf"))).cpu()
    dtype_max = torch.tensor([torch.finfo(g.dtype).max for g in grads], dtype=torch.float32)
    return torch.minimum(bound, dtype_max)


def _quantize_flat(codec: BucketCodec, stats: CommStats, quant_stats: bool) -> torch.Tensor:
    """Step 4: the bucket as one flat FP8 payload (uint8); sampled counts go into ``stats``."""
    flat = torch.empty(codec.layout.numel, dtype=torch.uint8, device=codec.grads[0].device)
    codec.quantize(0, codec.layout.numel, flat, quant_stats)
    if quant_stats:
        stats.saturated, stats.underflowed = codec.saturated, codec.underflowed
    return flat


def _reduce_chunk(flat: torch.Tensor, bounds: Sequence[int], fmt: Fp8Format, coll: Collectives) -> torch.Tensor:
    """Step 5: this rank's chunk [bounds[r], bounds[r+1]) summed over ranks in rank order and divided
    by N, in scaled units (fp32)."""
    sizes = [bounds[r + 1] - bounds[r] for r in range(coll.world_size)]
    mine = sizes[coll.rank]
    recv = torch.empty(coll.world_size * mine, dtype=torch.uint8, device=flat.device)
    coll.all_to_all_(recv, flat, [mine] * coll.world_size, sizes)
    return mean_of_fp8_rows(recv.view(coll.world_size, mine), fmt)  # rank order 0..N-1: deterministic


def _all_reduce_bucket(grads: Sequence[torch.Tensor], config: Fp8CommConfig, group: dist.ProcessGroup | None,
                       quant_stats: bool) -> CommStats:
    fmt, layout = config.fp8_format, FlatLayout.of(grads)
    stats = CommStats(elements=layout.numel)
    coll = Collectives(group, stats, config.exchange, config.p2p_piece_bytes)
    log2_scale, stats.found_inf, amax = _sync_log2_scales(grads, fmt, config.margin, coll)
    stats.log2_scales, stats.grad_amax = log2_scale.cpu(), synced_grad_amax(log2_scale, fmt, grads, amax)
    if stats.found_inf:
        return stats
    if coll.p2p:
        pipelined_all_reduce_(grads, layout, log2_scale, fmt, coll, stats, quant_stats)
        return stats
    bounds = uniform_bounds(layout.numel, coll.world_size)
    codec = BucketCodec(grads, layout, log2_scale, fmt)
    flat = _quantize_flat(codec, stats, quant_stats)
    mean_scaled = _reduce_chunk(flat, bounds, fmt, coll)
    chunk = bounds[1]  # every rank's slot in the gather; the last ranks' chunks are padded
    mine = torch.zeros(chunk, dtype=torch.uint8, device=flat.device)
    one = torch.ones((), dtype=torch.float32, device=flat.device)  # same scale: values already scaled
    cast_to_fp8(mean_scaled, one, fmt, out=mine[:mean_scaled.numel()].view(fmt.dtype))
    gathered = torch.empty(coll.world_size * chunk, dtype=torch.uint8, device=flat.device)
    coll.all_gather_(gathered, mine)
    codec.decode(0, gathered[:layout.numel])  # scale_inv: a power of two, exact
    codec.finish()
    return stats


def fp8_all_reduce_(grads: Sequence[torch.Tensor], *, config: Fp8CommConfig | None = None,
                    group: dist.ProcessGroup | None = None, quant_stats: bool = False) -> CommStats:
    """Replace each gradient by its mean over the ranks of ``group``, sent in FP8 (see the module
    docstring for the algorithm and its error bound). Tensors may differ in shape and dtype
    (fp32 / bf16 / fp16) and must share a device; they are bucketed by ``config.bucket_bytes``.

    Returns the merged ``CommStats`` of all buckets. If ``found_inf`` is set, the buckets holding
    the inf/NaN were left unchanged on every rank; skip the optimizer step.
    ``quant_stats``: also count saturated/underflowed elements (one extra pass).
    """
    config = config or Fp8CommConfig()
    grads = list(grads)
    _check_grads(grads)
    total = CommStats()
    for bucket in plan_buckets(grads, config.bucket_bytes):
        total = total.merge(_all_reduce_bucket([grads[i] for i in bucket], config, group, quant_stats))
    return total


def fp8_reduce_scatter(grads: Sequence[torch.Tensor], bounds: Sequence[int], *,
                       config: Fp8CommConfig | None = None, group: dist.ProcessGroup | None = None,
                       quant_stats: bool = False, requantize: bool = False,
                       scale_groups: Sequence[int] | None = None) -> tuple[torch.Tensor | None, CommStats]:
    """Steps 1-5 for one bucket: the mean over ranks of the flat elements [bounds[r], bounds[r+1])
    that this rank owns (``bounds``: N+1 non-decreasing element offsets from 0 to the bucket's
    numel, e.g. ``uniform_bounds`` or ``FlatLayout.owner_bounds`` for whole-tensor owners), as fp32
    in real units. Returns (None, stats with found_inf) when any rank had an inf/NaN gradient.
    ``requantize``: round the mean to FP8 with the shared scale, as ``fp8_all_reduce_`` does before
    its all-gather, so that a sharded optimizer sees bit-for-bit the replicated path's gradients.
    Each tensor's part of the chunk is saturated to +-max of that gradient's dtype, as the all-reduce's
    decode is (fp8train/_decode_cpu.py: a finite mean that FP8 rounding pushed past the max), so the
    owner can copy it into the gradient without creating an inf.
    ``scale_groups``: (len(grads),) group index per tensor; one shared scale per group (FSDP2 hands over
    each parameter as N pieces, one per destination rank: comm/fsdp.py)."""
    config = config or Fp8CommConfig()
    grads = list(grads)
    _check_grads(grads)
    fmt, layout = config.fp8_format, FlatLayout.of(grads)
    stats = CommStats(elements=layout.numel)
    coll = Collectives(group, stats, config.exchange, config.p2p_piece_bytes)
    if len(bounds) != coll.world_size + 1 or bounds[0] != 0 or bounds[-1] != layout.numel \
            or any(b > c for b, c in zip(bounds, bounds[1:])):
        raise ValueError(f"fp8_reduce_scatter: bounds must be {coll.world_size + 1} non-decreasing offsets "
                         f"from 0 to {layout.numel}; got {list(bounds)}")
    if not grads:
        return torch.zeros(0), stats
    log2_scale, stats.found_inf, amax = _sync_log2_scales(grads, fmt, config.margin, coll, scale_groups)
    stats.log2_scales, stats.grad_amax = log2_scale.cpu(), synced_grad_amax(log2_scale, fmt, grads, amax)
    if stats.found_inf:
        return None, stats
    flat = _quantize_flat(BucketCodec(grads, layout, log2_scale, fmt), stats, quant_stats)
    lo, hi = bounds[coll.rank], bounds[coll.rank + 1]
    mean = _reduce_chunk(flat, bounds, fmt, coll)
    if requantize:
        one = torch.ones((), dtype=torch.float32, device=mean.device)
        mean = cast_to_fp8(mean, one, fmt).to(torch.float32)  # exact decode of the FP8 mean
    scale_inv = torch.exp2(-log2_scale)
    for i, start, stop in layout.segments(lo, hi):
        grad_max = torch.finfo(grads[i].dtype).max
        mean[start - lo:stop - lo].mul_(scale_inv[i]).clamp_(-grad_max, grad_max)
    return mean, stats
