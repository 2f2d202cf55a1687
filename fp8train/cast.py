"""The FP8 cast: scale, clamp, round to the FP8 grid. One semantics, two implementations.

Semantics (``cast_to_fp8_reference``): ``q = clamp(x_fp32 * scale, -fmax, fmax).to(fp8)``.
  - The explicit clamp is the contract, not torch's cast: torch 2.13's CPU cast saturates E4M3 (even
    +-inf -> +-448) but overflows E5M2 to inf, so relying on it would make the two formats behave
    differently and hide overflow. Overflow is detected from amax *before* the cast (scaling.py).
  - Rounding is round-to-nearest-even; values below half the smallest subnormal flush to (signed) 0.
  - NaN stays NaN (the sign of a NaN is not part of the contract: x86 min/max may flip it; the
    fast path always writes 0x7F); +-inf becomes +-fmax and counts as saturated; the overflow
    itself reaches the GEMMs through the NaN ``scale_inv`` that ``ScalingState`` returns (recipes.py).

Fast path (``_cast_cpu.py``): the same function in integer arithmetic on the input's bits, compiled
once with torch.compile, for large contiguous fp32/bf16 CPU tensors. The test suite checks the two
paths bit-for-bit on every FP8 code, on edge tables, on millions of random values and across the
whole range of scales the fast path accepts.
Inside a ``torch.compile`` region the fast path gives way: the reference is traced, and inductor
fuses amax, scale and cast into its own generated loops (C++ here, Triton on GPU), bit-identical too.

GPU fast path (``_cast_triton.py``, eager CUDA sm89+ with triton installed): one hand-written
Triton kernel reads x once and writes the codes, optionally their transpose and the amax
(``cast_to_fp8_fused``): the ~10 launches and up to three reads of an eager cast become one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from fp8train._cast_cpu import fast_cast_into, fast_cast_supports
from fp8train._cast_triton import triton_cast_into, triton_cast_supported
from fp8train.formats import Fp8Format, as_fp8_format
from fp8train.scaling import tensor_to_amax

__all__ = [
    "FAST_CAST_MIN_NUMEL",
    "Fp8CastStats",
    "cast_to_fp8",
    "cast_to_fp8_reference",
    "cast_to_fp8_fused",
    "cast_to_fp8_with_transpose",
    "quantization_stats",
]

# Below this many elements the compiled kernel's call overhead (~20 us) outweighs its speed-up.
FAST_CAST_MIN_NUMEL = 1 << 16


def cast_to_fp8_reference(x_hp: torch.Tensor, scale: torch.Tensor,
                          fmt: Fp8Format | torch.dtype | str) -> torch.Tensor:
    """Eager reference cast: the semantics every other path must reproduce bit-for-bit.
    ``fmt``: E4M3 / E5M2, their torch float8 dtype or config name (``as_fp8_format``)."""
    fmt = as_fp8_format(fmt)
    y = x_hp.to(torch.float32) * scale
    return y.clamp(-fmt.max, fmt.max).to(fmt.dtype)


def _use_fast_path(x_hp: torch.Tensor, fast: bool) -> bool:
    return fast and not torch.compiler.is_compiling() and x_hp.device.type == "cpu" and x_hp.is_contiguous() and x_hp.numel() >= FAST_CAST_MIN_NUMEL


def cast_to_fp8(x_hp: torch.Tensor, scale: torch.Tensor, fmt: Fp8Format | torch.dtype | str, *, fast: bool = True,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``clamp(x_hp * scale, -fmax, fmax)`` rounded to ``fmt`` (see module docstring).

    ``scale`` is a 0-d fp32 tensor on x's device. With ``fast`` (default), large contiguous fp32 or
    bf16 CPU tensors with a power-of-two scale go through the compiled kernel, bit-identical to the
    reference; if compilation is not possible on this machine (no C++ compiler), a warning is
    given and the reference is used.
    ``out``: a preallocated contiguous ``fmt.dtype`` tensor of x's shape to write into. Reusing
    buffers matters on CPU: a fresh multi-MB allocation is mmap'd and page-faulted on every call.
    ``fmt``: E4M3 / E5M2, their torch float8 dtype or config name (``as_fp8_format``).
    """
    fmt = as_fp8_format(fmt)
    if out is not None and (out.dtype != fmt.dtype or out.shape != x_hp.shape or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {fmt.dtype} tensor of shape {tuple(x_hp.shape)}")
    if _use_triton_path(x_hp, fast) and x_hp.dim() <= 2:
        out = torch.empty(x_hp.shape, dtype=fmt.dtype, device=x_hp.device) if out is None else out
        triton_cast_into(x_hp, scale, fmt, out)
        return out
    log2_scale = fast_cast_supports(x_hp, scale, fmt) if _use_fast_path(x_hp, fast) else None
    if log2_scale is not None:
        out_u8 = torch.empty(x_hp.shape, dtype=torch.uint8, device=x_hp.device) if out is None else out.view(torch.uint8)
        try:
            fast_cast_into(x_hp, log2_scale, fmt, out_u8)
            return out_u8.view(fmt.dtype)
        except Exception as err:  # compilation needs a C++ toolchain; the reference needs none
            warnings.warn(f"fp8train: compiled CPU FP8 cast unavailable ({type(err).__name__}: {err}); "
                          "using the eager cast", RuntimeWarning, stacklevel=2)
    x_fp8 = cast_to_fp8_reference(x_hp, scale, fmt)
    return x_fp8 if out is None else out.copy_(x_fp8)


def _use_triton_path(x_hp: torch.Tensor, fast: bool) -> bool:
    return fast and x_hp.device.type == "cuda" and not torch.compiler.is_compiling() and triton_cast_supported(x_hp)


def cast_to_fp8_fused(x_hp: torch.Tensor, scale: torch.Tensor, fmt: Fp8Format | torch.dtype | str, *,
                      fast: bool = True, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(codes, transposed codes or None, tensor_to_amax(x_hp))`` with a scale known beforehand
    (the delayed and constant recipes): on CUDA one Triton kernel reads x_hp once for all three;
    elsewhere the amax, the cast and the transposed copy are separate passes (inductor fuses them
    inside torch.compile). ``transposed`` needs a 2-D x_hp: (M, N) codes and (N, M) contiguous."""
    fmt = as_fp8_format(fmt)
    if transposed and x_hp.dim() != 2:
        raise ValueError(f"transposed=True needs a 2-D tensor, got shape {tuple(x_hp.shape)}")
    if _use_triton_path(x_hp, fast):
        out = torch.empty(x_hp.shape, dtype=fmt.dtype, device=x_hp.device)
        out_t = torch.empty(x_hp.shape[::-1], dtype=fmt.dtype, device=x_hp.device) if transposed else None
        amax = torch.empty((), dtype=torch.float32, device=x_hp.device)
        triton_cast_into(x_hp, scale, fmt, out, out_t=out_t, amax_out=amax)
        return out, out_t, amax
    amax = tensor_to_amax(x_hp)
    x_fp8 = cast_to_fp8(x_hp, scale, fmt, fast=fast)
    return x_fp8, (x_fp8.t().contiguous() if transposed else None), amax


def cast_to_fp8_with_transpose(x_hp: torch.Tensor, scale: torch.Tensor, fmt: Fp8Format | torch.dtype | str, *,
                               fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of a 2-D ``x_hp`` (M, N) and the same codes transposed, contiguous (N, M): the two
    layouts the three GEMMs of a layer read (``torch._scaled_mm`` wants row-major a, column-major b).
    On CUDA one Triton kernel writes both from one read of x_hp; elsewhere the transposed copy is
    taken from the codes (1 byte per element), so the two are the same codes by construction."""
    if x_hp.dim() != 2:
        raise ValueError(f"cast_to_fp8_with_transpose needs a 2-D tensor, got shape {tuple(x_hp.shape)}")
    fmt = as_fp8_format(fmt)
    if _use_triton_path(x_hp, fast):
        out = torch.empty(x_hp.shape, dtype=fmt.dtype, device=x_hp.device)
        out_t = torch.empty(x_hp.shape[::-1], dtype=fmt.dtype, device=x_hp.device)
        triton_cast_into(x_hp, scale, fmt, out, out_t=out_t)
        return out, out_t
    x_fp8 = cast_to_fp8(x_hp, scale, fmt, fast=fast)
    return x_fp8, x_fp8.t().contiguous()


@dataclass(frozen=True, kw_only=True, slots=True)
class Fp8CastStats:
    """Element counts of one cast, as 0-d int64 tensors (no host sync until read).

    numel:        elements cast.
    saturated:    |x * scale| > fmax (clamped; +-inf included, NaN excluded).
    underflowed:  x != 0 that became +-0 (information lost to the subnormal floor).
    nonfinite:    inf or NaN in the input.
    """

    numel: int
    saturated: torch.Tensor
    underflowed: torch.Tensor
    nonfinite: torch.Tensor


def quantization_stats(x_hp: torch.Tensor, scale: torch.Tensor, x_fp8: torch.Tensor,
                       fmt: Fp8Format | torch.dtype | str) -> Fp8CastStats:
    """Counts for monitoring; costs a few extra passes, so callers sample it (every k steps)."""
    fmt = as_fp8_format(fmt)
    y_abs = (x_hp.to(torch.float32) * scale).abs()
    return Fp8CastStats(
        numel=x_hp.numel(),
        saturated=(y_abs > fmt.max).sum(),
        underflowed=((x_hp != 0) & (x_fp8.to(torch.float32) == 0)).sum(),
        nonfinite=(~torch.isfinite(x_hp)).sum(),
    )
