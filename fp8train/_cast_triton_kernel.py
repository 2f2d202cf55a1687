"""The Triton FP8 cast kernel (imports triton at the top: only ``_cast_triton`` loads it, lazily).

One pass over x_hp per tile: fp32 product with the scale, explicit clamp, FP8 codes, optionally the
same codes at transposed addresses and the tile's amax folded into a global one by an atomic max.
Numerical decisions (``cast_to_fp8_reference`` is the contract, bit for bit):
  - y = x_fp32 * scale in fp32, exactly the reference's product (any scale, not only powers of two).
  - Explicit clamp to [-fmax, fmax] with compare-and-select, not the conversion's saturation
    (sm89's cvt.satfinite saturates, the emulated paths and Triton's interpreter do not: +-inf
    becomes 0x78 = 256 there) and not tl.minimum/maximum, whose NaN behaviour is unspecified
    (a hardware min returns the non-NaN operand): comparisons with NaN are false, so NaN passes.
  - RNE conversion (``fp_downcast_rounding="rtne"``, Triton's default, spelt out).
  - NaN is written as 0x7F (a NaN code in both formats, the code the CPU fast path writes) by a
    select after the conversion: no conversion is trusted with NaN (the interpreter turns an fp32
    NaN into the E4M3 code 0x7C = 384).
  - amax: non-negative floats order like their bit patterns, and every NaN with its sign bit cleared
    (0x7F800001..0x7FFFFFFF) orders above +inf (0x7F800000). So an integer atomic max on the bits of
    |x| gives NaN if any element is NaN, else inf if any is inf, else max|x| -- tensor_to_amax's
    cases in one atomic, with no NaN flag (a float atomic max would drop NaN). The caller zeroes
    the accumulator (+0.0 has the bits 0); masked lanes load 0.0 and never win.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8train.formats import Fp8Format

__all__ = ["launch_cast"]

_FP8_TYPES = {"e4m3": tl.float8e4nv, "e5m2": tl.float8e5}
# Tiles: 64 x 64 when a transposed copy is written (the usual shared-memory transpose tile: 4096
# elements, 16 KiB of fp32 per program); otherwise x is one row of numel elements and a program
# takes 4096 contiguous ones (large enough to hide latency, small enough for odd sizes' tails).
_TILE_T = (64, 64)
_TILE_FLAT = (1, 4096)


@triton.jit
def _cast_kernel(x_ptr, scale_ptr, out_ptr, out_t_ptr, amax_bits_ptr, M, N,
                 FMAX: tl.constexpr, FP8: tl.constexpr, WRITE_T: tl.constexpr, WRITE_AMAX: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # one flat grid axis (CUDA limits the other two to 65535 programs)
    pid = tl.program_id(0)
    n_blocks_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // n_blocks_n).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: > 2**31 elements
    offs_n = (pid % n_blocks_n).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)                          # (BLOCK_M, BLOCK_N)
    x = tl.load(x_ptr + offs_m[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    y = x * tl.load(scale_ptr)
    y = tl.where(y > FMAX, FMAX, tl.where(y < -FMAX, -FMAX, y))  # NaN compares false: stays NaN
    codes = y.to(FP8, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    codes = tl.where(y != y, 0x7F, codes).to(tl.uint8)  # noqa: PLR0124 -- y != y: y is NaN
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], codes, mask=mask)
    if WRITE_T:
        # out_t is (N, M) contiguous: store the transposed tile so consecutive lanes write along M
        tl.store(out_t_ptr + offs_n[:, None] * M + offs_m[None, :], tl.trans(codes), mask=tl.trans(mask))
    if WRITE_AMAX:
        mag_bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # bits of |x|; fp32 holds bf16/fp16 exactly
        tl.atomic_max(amax_bits_ptr, tl.max(mag_bits))


def launch_cast(x_hp: torch.Tensor, scale: torch.Tensor, fmt: Fp8Format, out_u8: torch.Tensor,
                out_t_u8: torch.Tensor | None, amax_bits: torch.Tensor | None) -> None:
    """Launches the kernel on validated arguments (``_cast_triton.triton_cast_into``); ``out_u8`` /
    ``out_t_u8``: uint8 views of the FP8 outputs; ``amax_bits``: a zeroed 0-d int32 view of the fp32 amax."""
    rows, cols = (x_hp.shape if out_t_u8 is not None else (1, x_hp.numel()))
    block_m, block_n = _TILE_T if out_t_u8 is not None else _TILE_FLAT
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(cols, block_n),)
    _cast_kernel[grid](
        x_hp, scale, out_u8, out_u8 if out_t_u8 is None else out_t_u8,
        out_u8 if amax_bits is None else amax_bits, rows, cols,
        FMAX=fmt.max, FP8=_FP8_TYPES[fmt.name], WRITE_T=out_t_u8 is not None, WRITE_AMAX=amax_bits is not None,
        BLOCK_M=block_m, BLOCK_N=block_n,
    )
