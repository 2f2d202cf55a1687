"""``Fp8Conv1D``: Hugging Face transformers' ``Conv1D`` (GPT-2's c_attn, c_proj, c_fc) computing in FP8.

transformers' ``Conv1D(nf, nx)`` is a linear layer with a transposed weight: ``weight`` (in, out) =
(nx, nf), ``bias`` (out,), ``y = x @ W + b``. ``Fp8Conv1D`` is an ``Fp8Linear`` that holds that
same ``weight`` Parameter, shape (in, out) unchanged, and hands its GEMMs the transposed VIEW W^T
(out, in) (``_weight_out_in``; no copy): so the parameter names and shapes are Conv1D's, a
pre-conversion state_dict and HF checkpoints load unchanged, and optimizer state keyed by name or by
Parameter stays valid.

A subclass rather than a wrapper: the casts, the three GEMMs and the scaling state are Fp8Linear's
own code (a wrapper would add a ``.linear.`` level to every name, or copy the weight), so
monitoring, faults and the trainer see it as an ``Fp8Linear``. Numerics: the weight role casts
W^T, the (out, in) operand, exactly as for ``nn.Linear``, so row/block/MX scales
(``Fp8Config.granularity``) follow the GEMM's reduction dim (in) here too; a per-tensor scale does
not see the transpose at all (tests/test_hf_conv1d.py: bit-exact against ``Fp8Linear`` on a copy of
W^T, every granularity). Cost: the cast reads a
non-contiguous view, which the compiled CPU cast and the Triton kernel do not take (the eager cast
runs, bit-identical); autograd transposes the (out, in) weight gradient back into ``weight.grad``.

FP8 primary weights (``fp8_weight=True``) are not supported: the stored codes, their checkpoint
conversions and the optimizer's master would need the transposed layout too.
transformers is never imported here: ``from_conv1d`` reads the module's ``weight`` and ``bias``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fp8train.config import Fp8Config
from fp8train.linear import Fp8Linear

__all__ = ["Fp8Conv1D"]


class Fp8Conv1D(Fp8Linear):
    """``Fp8Linear`` whose ``weight`` has transformers' Conv1D layout (in_features, out_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 config: Fp8Config | None = None, fp8_weight: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        if fp8_weight:
            raise ValueError("Fp8Conv1D.fp8_weight=True is not supported (a transposed weight); allowed: False")
        super().__init__(in_features, out_features, bias=bias, config=config, device=device, dtype=dtype)
        # nn.Linear's initialisation, stored in Conv1D's layout (from_conv1d replaces it, on meta)
        self.weight = nn.Parameter(self.weight.detach().t().contiguous())        # (in, out)

    @classmethod
    def from_conv1d(cls, conv: nn.Module, config: Fp8Config) -> Fp8Conv1D:
        """Wraps ``conv``'s own ``weight`` (in, out) and ``bias`` Parameters (no copy), through
        ``Fp8Linear.from_linear`` (the same scaling-state set-up)."""
        in_features, out_features = conv.weight.shape
        return cls.from_linear(_LinearShape(in_features, out_features, conv.weight, conv.bias), config)

    def _weight_out_in(self) -> torch.Tensor:
        return self.weight.t()                                                   # (out, in) view

    @property
    def nx(self) -> int:
        """Conv1D's name for in_features (code written for Conv1D reads it)."""
        return self.in_features

    @property
    def nf(self) -> int:
        """Conv1D's name for out_features."""
        return self.out_features


@dataclass(frozen=True, slots=True)
class _LinearShape:
    """What ``Fp8Linear.from_linear`` reads of a layer, for a Conv1D."""

    in_features: int
    out_features: int
    weight: nn.Parameter
    bias: nn.Parameter | None
