"""A finite gradient near its dtype's max must come back finite from the FP8 all-reduce, and a true
inf must still be reported.

fp16 64000 with E4M3: amax 64000 -> scale 2**-8 -> 250 on the FP8 grid rounds to 256 -> decoded
256 * 2**8 = 65536 > 65504 = fp16 max. Decoding saturates to +-dtype max (fp8train/_decode_cpu.py).
Known answers are exact: the companions u and -3u of each big value land on the E4M3 grid at its
scale, and the saturated value is the dtype's max, so comparisons are bit-exact (tier 1).
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import run_workers

from fp8train._decode_cpu import FAST_DECODE_MIN_NUMEL, decode_fp8_into
from fp8train.comm import FlatLayout, Fp8CommConfig, fp8_all_reduce_, fp8_reduce_scatter, uniform_bounds
from fp8train.formats import E4M3, E5M2

# (dtype, a finite value whose E4M3 rounding at its own power-of-two scale decodes beyond the dtype's
# max, a unit u: the gradient is [big, u, -3u], the example for fp16)
NEAR_MAX = [
    (torch.float16, 64000.0, 1.0),       # scale 2**-8: 250 -> 256 on the grid, 256 * 2**8 = 65536 > 65504
    (torch.bfloat16, 3.3e38, 2.0**120),  # scale 2**-120: ~248.3 -> 256, 2**128 (inf even in fp32)
    (torch.float32, 3.4e38, 2.0**120),   # ~255.8 -> 256, 2**128 as well
]


def _grad(dtype: torch.dtype, big: float, reps: int, unit: float = 1.0) -> torch.Tensor:
    return torch.tensor([big, unit, -3 * unit], dtype=dtype).repeat(reps)


def _expected(dtype: torch.dtype, reps: int, unit: float = 1.0) -> torch.Tensor:
    return _grad(dtype, torch.finfo(dtype).max, reps, unit)


def _worker_near_max(rank: int, world_size: int, exchange: str, reps: int) -> list:
    config = Fp8CommConfig(exchange=exchange)
    out = []
    for dtype, big, unit in NEAR_MAX:  # the same gradient on every rank: the mean is the input
        grad = _grad(dtype, big, reps, unit)
        stats = fp8_all_reduce_([grad], config=config)
        out.append((grad, stats.found_inf))
    inf_grad = _grad(torch.float16, math.inf if rank == 1 else 64000.0, reps)  # a true inf on one rank
    before = inf_grad.clone()
    found_inf = fp8_all_reduce_([inf_grad], config=config).found_inf
    out.append((torch.equal(inf_grad, before), found_inf))
    return out


# the compiled decode (>= 2**16 elements) is covered by test_decode_saturates_to_the_output_dtype_max:
# compiling it in two spawned processes would cost ~1 min of the default suite
@pytest.mark.parametrize("exchange", ["collective", "p2p"])
def test_all_reduce_saturates_a_finite_mean_and_reports_a_true_inf(exchange):
    reps = 2  # [big, u, -3u] twice: every rank's chunk holds a big value
    for rank_out in run_workers(_worker_near_max, 2, exchange, reps, timeout_s=120):
        *near_max, (inf_bucket_unchanged, inf_found) = rank_out
        for (dtype, _, unit), (grad, found_inf) in zip(NEAR_MAX, near_max):
            assert not found_inf, dtype
            assert torch.isfinite(grad).all(), (dtype, grad[:3])
            assert torch.equal(grad, _expected(dtype, reps, unit)), (dtype, grad[:3])
        assert inf_found  # a real inf is still an overflow, reported on every rank
        assert inf_bucket_unchanged  # ... and its bucket left as it was (not sent)


def _worker_reduce_scatter(rank: int, world_size: int) -> torch.Tensor:
    grad = _grad(torch.float16, 64000.0, 2)
    chunk, stats = fp8_reduce_scatter([grad], uniform_bounds(FlatLayout.of([grad]).numel, world_size),
                                      requantize=True)
    assert not stats.found_inf
    return chunk


def test_reduce_scatter_chunk_fits_the_gradient_dtype():
    # the fp32 chunk is copied into the fp16 gradient by its owner (ZeRO): it must not exceed 65504
    chunks = run_workers(_worker_reduce_scatter, 2, timeout_s=90)
    assert torch.equal(torch.cat(chunks), _expected(torch.float16, 2).float())


@pytest.mark.parametrize("numel", [3, FAST_DECODE_MIN_NUMEL + 3], ids=["eager", "compiled"])
@pytest.mark.parametrize(("fmt", "dtype", "log2_scale"), [
    (E4M3, torch.float16, -8),     # 448 * 2**8 = 114688 > 65504
    (E5M2, torch.float16, 0),      # E5M2's max 57344 fits; its top codes do not after * 2**1 below
    (E4M3, torch.bfloat16, -120),  # 448 * 2**120 > bf16 max
    (E4M3, torch.float32, -120),
])
def test_decode_saturates_to_the_output_dtype_max(numel, fmt, dtype, log2_scale):
    scale_inv = torch.tensor(2.0 ** (-log2_scale + (1 if fmt is E5M2 else 0)))
    codes = torch.tensor([fmt.max, -fmt.max, 1.0], dtype=torch.float32).repeat(numel // 3 + 1)[:numel]
    codes_u8 = codes.to(fmt.dtype).view(torch.uint8)
    out = torch.empty(numel, dtype=dtype)
    decode_fp8_into(codes_u8, fmt, scale_inv, out)
    fmax = torch.finfo(dtype).max
    expected = torch.tensor([fmax, -fmax, float(scale_inv)], dtype=torch.float32).repeat(numel // 3 + 1)[:numel]
    assert torch.equal(out, expected.to(dtype))
