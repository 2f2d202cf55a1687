"""Quantize and decode one bucket of gradients by flat element ranges, with per-tensor shared scales:
the single place where the FP8 all-reduce paths (pipelined p2p, collective, reduce-scatter) turn
gradients into FP8 codes and codes back into gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fp8train._decode_cpu import decode_fp8_into
from fp8train.cast import cast_to_fp8, quantization_stats
from fp8train.comm._layout import FlatLayout
from fp8train.formats import Fp8Format

__all__ = ["BucketCodec"]


class BucketCodec:
    """The bucket's tensors as flat views with their shared scales; quantize and decode any range of
    flat element positions (a whole bucket, a rank's chunk or one p2p piece), crossing tensor
    boundaries. Saturated / underflowed counts accumulate when ``quantize(count=True)``."""

    def __init__(self, grads: Sequence[torch.Tensor], layout: FlatLayout, log2_scale: torch.Tensor,
                 fmt: Fp8Format) -> None:
        self.grads, self.layout, self.fmt = grads, layout, fmt
        self.flat_in = [g.reshape(-1) for g in grads]  # views where contiguous
        self.flat_out = [g.view(-1) if g.is_contiguous() else torch.empty(g.numel(), dtype=g.dtype, device=g.device)
                         for g in grads]
        self.scale = list(torch.exp2(log2_scale).unbind(0))
        self.scale_inv = list(torch.exp2(-log2_scale).unbind(0))
        self.saturated = self.underflowed = 0

    def quantize(self, start: int, stop: int, out_u8: torch.Tensor, count: bool) -> None:
        """FP8 codes of flat elements [start, stop) into out_u8 (stop - start bytes)."""
        for i, lo, hi in self.layout.segments(start, stop):
            off = self.layout.offsets[i]
            x = self.flat_in[i][lo - off:hi - off]
            q = cast_to_fp8(x, self.scale[i], self.fmt, out=out_u8[lo - start:hi - start].view(self.fmt.dtype))
            if count:
                counts = quantization_stats(x, self.scale[i], q, self.fmt)
                self.saturated += int(counts.saturated)
                self.underflowed += int(counts.underflowed)

    def decode(self, start: int, codes_u8: torch.Tensor) -> None:
        """Write the mean whose FP8 codes for flat elements [start, start + len) are ``codes_u8``."""
        for i, lo, hi in self.layout.segments(start, start + codes_u8.numel()):
            off = self.layout.offsets[i]
            decode_fp8_into(codes_u8[lo - start:hi - start], self.fmt, self.scale_inv[i],
                            self.flat_out[i][lo - off:hi - off])

    def finish(self) -> None:
        """Copy decoded values into the gradients that are not contiguous (the others were written)."""
        for g, out in zip(self.grads, self.flat_out):
            if not g.is_contiguous():
                g.copy_(out.view(g.shape))
