"""``Fp8Tensor``: FP8 data plus the fp32 ``scale_inv`` that decodes it, and ``quantize``.

A plain container, not a ``torch.Tensor`` subclass: FP8 values only ever meet high-precision ones in
explicit GEMM and optimizer code, so no operator dispatch is needed (and nothing in torch is patched).
``data`` is a real float8 tensor; it is viewed as uint8 only at the wire (comm/).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8train.cast import Fp8CastStats, cast_to_fp8, quantization_stats
from fp8train.formats import E4M3, FP8_FORMATS, Fp8Format, as_fp8_format
from fp8train.scaling import amax_to_scale, tensor_to_amax

__all__ = ["Fp8Tensor", "dequantize", "expand_block_scales", "quantize"]


def expand_block_scales(scales: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """One value per element from one per ``block`` (rows, cols) of a 2-D tensor of ``shape``: the
    (ceil(R/br), ceil(C/bc)) grid repeated over each block, cropped where the last block is partial."""
    rows, cols = block
    full = scales.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    return full[: shape[0], : shape[1]]


@dataclass(kw_only=True, slots=True)
class Fp8Tensor:
    """data:       float8 tensor (``fmt.dtype``), the stored value ``x * scale``.
    scale_inv:  0-d fp32 tensor, ``1 / scale`` (a power of two): ``x ~= data * scale_inv``.
    orig_dtype: the high-precision dtype the values came from and ``dequantize`` returns.
    stats:      element counts of the cast, when asked for (``quantize(..., with_stats=True)``).
    data_t:     2-D only, optional: the same codes transposed and contiguous, written by the cast
                (``ScalingState.quantize(..., transposed=True)``), so that a GEMM wanting the other
                layout (``torch._scaled_mm``: row-major a, column-major b) needs no copy after the cast.
    block:      None (per-tensor: 0-d ``scale_inv``), or the (rows, cols) that one scale covers in a
                2-D tensor (``Fp8Config.granularity``, fp8train/blocks.py): ``scale_inv`` is then
                (ceil(R/rows), ceil(C/cols)), fp32 or E8M0 (``torch.float8_e8m0fnu``, MX), each entry
                a power of two; the last block of a ragged dim is partial.
    """

    data: torch.Tensor
    scale_inv: torch.Tensor
    orig_dtype: torch.dtype
    stats: Fp8CastStats | None = None
    data_t: torch.Tensor | None = None
    block: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.data.dtype not in {f.dtype for f in FP8_FORMATS.values()}:
            raise ValueError(f"Fp8Tensor.data must be a float8 dtype, got {self.data.dtype}")

    @property
    def fmt(self) -> Fp8Format:
        return next(f for f in FP8_FORMATS.values() if f.dtype == self.data.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def log2_scale(self) -> torch.Tensor:
        """The scaling bias: log2 of the scale (an integer-valued fp32 tensor)."""
        return -torch.log2(self.scale_inv.to(torch.float32))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """data * scale_inv in fp32 (exact: a power-of-two scale, per tensor or per block), then cast
        to ``dtype`` (default ``orig_dtype``)."""
        scale_inv = self.scale_inv.to(torch.float32)
        if self.block is not None:
            scale_inv = expand_block_scales(scale_inv, self.block, self.data.shape)
        x_fp32 = self.data.to(torch.float32) * scale_inv
        return x_fp32.to(dtype or self.orig_dtype)

    def t(self) -> Fp8Tensor:
        """Transposed 2-D tensor, same scale: a view, or the stored transposed copy when there is
        one (the two layouts swap, so ``x.t().t()`` has ``x``'s). Block scales transpose with it."""
        if self.block is not None:
            return Fp8Tensor(data=self.data.t(), scale_inv=self.scale_inv.t(), orig_dtype=self.orig_dtype,
                             block=(self.block[1], self.block[0]))
        if self.data_t is None:
            return Fp8Tensor(data=self.data.t(), scale_inv=self.scale_inv, orig_dtype=self.orig_dtype)
        return Fp8Tensor(data=self.data_t, scale_inv=self.scale_inv, orig_dtype=self.orig_dtype, data_t=self.data)


def quantize(
    x_hp: torch.Tensor,
    fmt: Fp8Format | torch.dtype | str = E4M3,
    *,
    scale: torch.Tensor | None = None,
    margin: int = 0,
    with_stats: bool = False,
    fast: bool = True,
    out: torch.Tensor | None = None,
) -> Fp8Tensor:
    """Quantize a high-precision tensor to FP8.

    fmt:        E4M3 / E5M2, or torch.float8_e4m3fn / torch.float8_e5m2, or "e4m3" / "e5m2".
    scale:      power-of-two fp32 scale to use; default: just-in-time from this tensor's amax
                (the ``current`` recipe), with ``margin`` extra powers of two of headroom.
    with_stats: also count saturated / underflowed / non-finite elements (extra passes).
    fast:       allow the compiled CPU cast kernel for large tensors (bit-identical).
    out:        preallocated ``fmt.dtype`` tensor of x's shape to write the data into.
    """
    fmt = as_fp8_format(fmt)
    if scale is None:
        scale = amax_to_scale(tensor_to_amax(x_hp), fmt, margin=margin)
    scale = scale.to(device=x_hp.device, dtype=torch.float32)
    x_fp8 = cast_to_fp8(x_hp, scale, fmt, fast=fast, out=out)
    stats = quantization_stats(x_hp, scale, x_fp8, fmt) if with_stats else None
    return Fp8Tensor(data=x_fp8, scale_inv=scale.reciprocal(), orig_dtype=x_hp.dtype, stats=stats)


def dequantize(x: Fp8Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Functional form of ``Fp8Tensor.dequantize``."""
    return x.dequantize(dtype)
