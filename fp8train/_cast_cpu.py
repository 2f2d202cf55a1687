"""The compiled CPU FP8 cast: ``cast_to_fp8_reference`` rewritten in integer arithmetic on the
input's fp32 bit pattern, so that inductor emits one vectorised loop (torch's own float->fp8
conversion is a scalar routine, ~5x slower; a float->int bitcast inside the loop costs ~30%).

With a power-of-two scale 2**k, the bits of y = x * 2**k are the bits of x with k added to the
exponent field, as long as x and y are normal fp32 numbers. Non-negative floats order like their bit
patterns, so every comparison against a y threshold becomes an integer comparison of |x|'s bits
against the threshold divided by 2**k -- exact, because that is again a power-of-two rescaling:
  |y| >= min_normal: code = fp32 bits of |y| rounded to nearest even at the FP8 mantissa width,
                     exponent re-biased (a carry out of the mantissa bumps the exponent: correct);
  |y| <  min_normal: code = round_half_even(|y| / min_subnormal) -- 0..2**M, where 2**M is already
                     min_normal's own code when a subnormal rounds up;
  |y| >  fmax:       the code of fmax (the explicit clamp; +-inf included);
  NaN:               0x7F (a NaN code in both formats); sign bit from x otherwise (-0 included).
The exponent trick needs x normal wherever |y| >= min_normal, 2**k / min_subnormal finite, and
fmax / 2**k finite: ``fast_cast_supports`` checks the scale; other scales take the reference.
"""

from __future__ import annotations

import functools
import math
import struct

import torch

from fp8train.formats import Fp8Format, format_by_name

__all__ = ["fast_cast_into", "fast_cast_supports"]

_FP32_MAG_MASK = 0x7FFFFFFF
_FP32_INF_BITS = 0x7F800000
_SUPPORTED_INPUT_DTYPES = (torch.float32, torch.bfloat16)


def _fp32_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _log2_scale_range(fmt: Fp8Format) -> tuple[int, int]:
    lo = math.floor(fmt.log2_max) - 127          # fmax / 2**k must stay below fp32's max
    # 2**k / min_subnormal must stay finite (0 * inf would be NaN); this also keeps min_normal / 2**k
    # a normal fp32, since min_normal > min_subnormal
    hi = 127 + round(math.log2(fmt.min_subnormal))
    return lo, hi


def _dropped_bits(fmt: Fp8Format) -> int:
    return 23 - fmt.mantissa_bits  # fp32 mantissa bits the format drops


def _rebias(fmt: Fp8Format) -> int:
    """fp32 exponent bias minus the format's, in units of the format's lowest exponent bit."""
    return (127 - fmt.exponent_bias) << fmt.mantissa_bits


def _round_addend(log2_scale: int, fmt: Fp8Format) -> int:
    shift = _dropped_bits(fmt)
    return (log2_scale << 23) + (1 << (shift - 1)) - 1 - (_rebias(fmt) << shift)


def fast_cast_supports(x_hp: torch.Tensor, scale: torch.Tensor, fmt: Fp8Format) -> int | None:
    """The integer log2 of ``scale`` when the compiled kernel applies to (x_hp, scale), else None.
    Reads the scale on the host: free on CPU, where this kernel runs."""
    if x_hp.dtype not in _SUPPORTED_INPUT_DTYPES:
        return None
    mantissa, exponent = math.frexp(float(scale))
    k = exponent - 1
    lo, hi = _log2_scale_range(fmt)
    return k if mantissa == 0.5 and lo <= k <= hi else None


def _kernel(x_hp: torch.Tensor, x_raw_bits: torch.Tensor, round_addend: torch.Tensor, subnormal_thr: torch.Tensor,
            saturate_thr: torch.Tensor, subnormal_mult: torch.Tensor, out_u8: torch.Tensor, *, fmt_name: str) -> None:
    fmt = format_by_name(fmt_name)
    shift = _dropped_bits(fmt)
    fmax_code = (_fp32_bits(fmt.max) >> shift) - _rebias(fmt)
    if x_raw_bits.dtype == torch.int16:  # bf16 is the top half of an fp32 bit pattern
        x_bits = x_raw_bits.to(torch.int32) << 16
    else:
        x_bits = x_raw_bits
    mag = x_bits & _FP32_MAG_MASK                        # bits of |x|
    # bits of |y| = mag + (k << 23); round to nearest even at bit `shift`: + half an ulp - 1 + the
    # kept lowest bit (adding k << 23 leaves that bit unchanged); re-bias the exponent. The three
    # constants are folded into round_addend (see _round_addend).
    code = ((mag + round_addend + ((mag >> shift) & 1)) >> shift).to(torch.float32)
    code_subnormal = torch.round(x_hp.to(torch.float32).abs() * subnormal_mult)  # half-to-even
    code = torch.where(mag < subnormal_thr, code_subnormal, code)
    code = torch.where(mag > saturate_thr, float(fmax_code), code)
    code = code + torch.where(x_bits < 0, 128.0, 0.0)
    code = torch.where(mag > _FP32_INF_BITS, 127.0, code)
    out_u8.copy_(code.to(torch.uint8))


@functools.cache
def _compiled_kernel(fmt_name: str):
    """Compiled once per format (constants baked in) and input dtype; every numel shares a kernel."""
    return torch.compile(functools.partial(_kernel, fmt_name=fmt_name), fullgraph=True)


def fast_cast_into(x_hp: torch.Tensor, log2_scale: int, fmt: Fp8Format, out_u8: torch.Tensor) -> None:
    """Writes the FP8 codes of clamp(x_hp * 2**log2_scale) into ``out_u8`` (uint8, x's numel).
    ``x_hp``: contiguous fp32 or bf16 on CPU; ``log2_scale`` from ``fast_cast_supports``."""
    # detach: requires_grad would be one more guard, i.e. one more compiled variant
    x_flat, out_flat = x_hp.detach().reshape(-1), out_u8.view(-1)
    x_raw_bits = x_flat.view(torch.int32 if x_flat.dtype == torch.float32 else torch.int16)
    for t in (x_flat, x_raw_bits, out_flat):
        torch._dynamo.mark_dynamic(t, 0)  # one kernel for every numel, no recompiles
    int32 = dict(dtype=torch.int32)
    _compiled_kernel(fmt.name)(
        x_flat, x_raw_bits,
        torch.tensor(_round_addend(log2_scale, fmt), **int32),
        torch.tensor(_fp32_bits(fmt.min_normal * 2.0**-log2_scale), **int32),
        torch.tensor(_fp32_bits(fmt.max * 2.0**-log2_scale), **int32),
        torch.tensor(2.0 ** (log2_scale - round(math.log2(fmt.min_subnormal))), dtype=torch.float32),
        out_flat,
    )
