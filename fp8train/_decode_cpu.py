"""FP8 -> fp32 decoding for the gradient all-reduce, fast on CPU.

torch's CPU float8 -> float32 conversion is a scalar routine (~4 ns per element on 2 cores here).
Decoding goes through fp16 instead, which F16C converts in vector registers: an FP8 code with M
mantissa bits and exponent bias B, its magnitude bits shifted left by 10 - M into an fp16 pattern
(sign moved to bit 15), IS an fp16 number equal to the FP8 value times 2**(B - 15) -- for normals
and subnormals alike, because both formats place the binary point the same way and fp16 has the
wider exponent. So
    value = fp16_bits_to_float(((code & 0x7F) << (10 - M)) | ((code & 0x80) << 8)) * 2**(15 - B)
exactly. E5M2 is the upper byte of fp16 (shift 8, factor 1). NaN codes are not preserved (E4M3's
0x7F would decode as 480): payloads built by ``fp8train.comm`` never hold NaN (inputs are clamped,
and a bucket with an inf/NaN gradient is not sent).

Saturation (``decode_fp8_into``): the decoded value ``code * scale_inv`` is clamped to +-max of the
output dtype before it is written. Numerical decision: the codes encode the mean of finite values
of that dtype (a bucket with an inf/NaN is never sent), so the true value is finite and within +-max;
only FP8 rounding can push it past (fp16 64000 at scale 2**-8 is 250 -> 256 on the E4M3 grid,
decoded 65536 > 65504), and writing that as inf would be an overflow nobody reported (``found_inf``
is False). The saturated value is nearer the true mean than the FP8 value, so the error bound of
``comm/allreduce.py`` still holds. The multiplications stay exact: the FP8 value (times the format
factor, <= 57344) first, then ``scale_inv``, so the factor and a scale_inv near 2**126 never meet in
one fp32 product that would overflow.
"""

from __future__ import annotations

import functools
import warnings

import torch

from fp8train.formats import Fp8Format

__all__ = ["FAST_DECODE_MIN_NUMEL", "decode_fp8_into", "mean_of_fp8_rows"]

# Below this many elements per row, the compiled kernel's call overhead outweighs its speed-up.
FAST_DECODE_MIN_NUMEL = 1 << 16


def _as_fp32_times_factor(code_u8: torch.Tensor, mag_shift: torch.Tensor) -> torch.Tensor:
    """FP8 codes -> fp32 values times 2**(B - 15) (exact), via an fp16 bit pattern."""
    i = code_u8.to(torch.int32)
    bits = ((i & 0x7F) << mag_shift) | ((i & 0x80) << 8)
    return bits.to(torch.int16).view(torch.float16).to(torch.float32)


def _mean_kernel(rows_u8: torch.Tensor, mag_shift: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    acc = _as_fp32_times_factor(rows_u8[0], mag_shift)
    for r in range(1, rows_u8.shape[0]):  # unrolled in rank order: one fused loop, fixed summation order
        acc = acc + _as_fp32_times_factor(rows_u8[r], mag_shift)
    return acc * factor / rows_u8.shape[0]  # * 2**(15 - B): exact; / N: one rounding


def _decode_kernel(code_u8: torch.Tensor, mag_shift: torch.Tensor, factor: torch.Tensor, scale_inv: torch.Tensor,
                   out_max: torch.Tensor, out: torch.Tensor) -> None:
    value = _as_fp32_times_factor(code_u8, mag_shift) * factor * scale_inv  # left to right: both exact
    out.copy_(value.clamp(-out_max, out_max))  # saturate to out's dtype (module docstring)


@functools.cache
def _compiled(kernel_name: str):
    """One compiled function per kernel; the format's shift and factor are tensor arguments, so
    formats share its code (variants only per row count N and output dtype: few, well under
    dynamo's recompile limit of 8 per function)."""
    kernel = {"mean": _mean_kernel, "decode": _decode_kernel}[kernel_name]
    return torch.compile(kernel, fullgraph=True)


def _fast(t: torch.Tensor, numel: int) -> bool:
    return t.device.type == "cpu" and numel >= FAST_DECODE_MIN_NUMEL


def _layout(fmt: Fp8Format, device: torch.device) -> tuple[torch.Tensor, float]:
    return torch.tensor(10 - fmt.mantissa_bits, dtype=torch.int32, device=device), 2.0 ** (15 - fmt.exponent_bias)


def mean_of_fp8_rows(rows_u8: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """(N, n) uint8 FP8 codes -> (n,) fp32 mean over the rows, summed in row order 0..N-1."""
    n_rows, numel = rows_u8.shape
    if not _fast(rows_u8, numel):
        parts = rows_u8.view(fmt.dtype)
        acc = parts[0].to(torch.float32)
        for r in range(1, n_rows):
            acc = acc + parts[r].to(torch.float32)
        return acc / n_rows
    mag_shift, factor = _layout(fmt, rows_u8.device)
    torch._dynamo.mark_dynamic(rows_u8, 1)  # one kernel for every chunk size (N is fixed per run)
    return _compiled("mean")(rows_u8, mag_shift, torch.tensor(factor, dtype=torch.float32))


def decode_fp8_into(code_u8: torch.Tensor, fmt: Fp8Format, scale_inv: torch.Tensor, out: torch.Tensor) -> None:
    """out (any float dtype, code's numel, contiguous) <- FP8 codes * scale_inv (0-d fp32, a power of
    two: exact before the final rounding to out's dtype), saturated to +-max of out's dtype (a finite
    mean that FP8 rounding pushed past it; module docstring)."""
    out_max = torch.finfo(out.dtype).max
    if not _fast(code_u8, code_u8.numel()):
        out.copy_(code_u8.view(fmt.dtype).to(torch.float32).mul_(scale_inv).clamp_(-out_max, out_max))
        return
    mag_shift, factor = _layout(fmt, code_u8.device)
    for t in (code_u8, out):
        torch._dynamo.mark_dynamic(t, 0)
    with warnings.catch_warnings():  # inductor notes "bf16 and fp16 mixed" for a bf16 out: harmless
        warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")
        f32 = dict(dtype=torch.float32, device=code_u8.device)
        _compiled("decode")(code_u8, mag_shift, torch.tensor(factor, **f32), scale_inv.to(torch.float32),
                            torch.tensor(out_max, **f32), out)
