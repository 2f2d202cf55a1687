"""The bf16 mixed-precision baseline: real bf16 autocast on CUDA, an exact emulation elsewhere.

On CPU, bf16 matmul is ~100x slower than fp32, so bf16 is *emulated*: every GEMM operand is
rounded to bf16 (round-to-nearest-even, ``.to(torch.bfloat16)``) and the product is computed in fp32
with fp32 accumulation. Rounding to bf16 and back to fp32 is exact in the second step, so the GEMM
sees exactly the bf16 operands that a bf16 tensor-core GEMM would see, and accumulates as it does
(fp32). ``Bf16Linear`` computes, for x (B..., in), w (out, in), b (out,):

Forward:   y  = bf16(x) @ bf16(w)^T + b                (fp32 GEMM; b added in fp32; y in x's dtype)
Backward:  dx = bf16(dy) @ bf16(w)                     dgrad, (M, out) @ (out, in), in x's dtype
           dw = bf16(dy)^T @ bf16(x)                   wgrad, (out, M) @ (M, in), in w's dtype
           db = sum(bf16(dy)) in fp32                  in b's dtype

Where it differs from ``torch.autocast(dtype=torch.bfloat16)``: autocast also rounds the bias to
bf16 and returns y in bf16; here only GEMM operands are rounded, and y keeps the input's dtype
(the next GEMM rounds it again when it is an operand). Non-GEMM ops (norms, softmax, residual
adds) therefore run in the input's precision -- what a careful bf16 recipe keeps in fp32 anyway.

Usage (what the trainer does): ``with bf16_autocast(device): ...`` on CUDA, and
``convert_to_bf16_emulated(model)`` once before training elsewhere. Importing this module patches
nothing in torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fp8train.convert import replace_submodules
from fp8train.linear import Fp8Linear

__all__ = ["Bf16Linear", "bf16_autocast", "convert_to_bf16_emulated", "round_to_bf16"]


def round_to_bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to the nearest bf16 value (ties to even), returned in fp32 (exact: bf16 values
    are a subset of fp32). inf and nan pass through; fp32 values above bf16's max round to inf."""
    return t.to(torch.bfloat16).to(torch.float32)


class _Bf16LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x_bf16 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)              # (M, in)
        w_bf16 = weight.to(torch.bfloat16)                                  # (out, in)
        # Autocast off: the operands are fp32 on purpose; a surrounding CPU autocast would run this
        # GEMM in bf16 (~100x slower on CPU, and a bf16 output instead of fp32 accumulation).
        with torch.autocast(device_type=x.device.type, enabled=False):
            y_2d = x_bf16.float() @ w_bf16.float().t()                      # (M, out), fp32
            # Bias in fp32, unrounded: it is not a GEMM operand, costs O(out), and rounding it would
            # add noise that the bf16-GEMM baseline is not meant to measure.
            if bias is not None:
                y_2d = y_2d + bias.float()
        # Saved as bf16 (2 bytes per element; the fp32 copy is rebuilt exactly in backward).
        ctx.save_for_backward(x_bf16, w_bf16)
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y_2d.to(x.dtype).reshape(*x.shape[:-1], y_2d.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        x_bf16, w_bf16 = ctx.saved_tensors
        dy_2d = round_to_bf16(dy.reshape(-1, dy.shape[-1]))                 # (M, out), fp32
        dx = dw = db = None
        with torch.autocast(device_type=dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx_2d = (dy_2d @ w_bf16.float()).to(ctx.x_dtype)            # (M, in)
                dx = dx_2d.reshape(*dy.shape[:-1], dx_2d.shape[-1])
            if ctx.needs_input_grad[1]:
                dw = (dy_2d.t() @ x_bf16.float()).to(ctx.w_dtype)          # (out, in)
            if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
                # The rounded dy, as a bf16 backward would sum it; fp32 accumulation.
                db = dy_2d.sum(0).to(ctx.bias_dtype)
        return dx, dw, db


class Bf16Linear(nn.Linear):
    """Drop-in ``nn.Linear`` (same ``weight`` / ``bias`` parameters and names, no extra state)
    whose three GEMMs see bf16-rounded operands and accumulate in fp32 (see the module docstring)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Bf16Linear:
        """Wraps ``linear``'s own Parameter objects (no copy), so optimizers and tied references
        (GPT's lm_head / wte) that hold them stay valid."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, emulated=bf16"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Bf16LinearFn.apply(x, self.weight, self.bias)


def convert_to_bf16_emulated(
    model: nn.Module,
    *,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Replace ``nn.Linear`` modules of ``model`` by ``Bf16Linear``, in place; returns model.

    Every ``nn.Linear`` is converted, the output head included (bf16 mixed precision runs every
    GEMM in bf16), unless ``module_filter_fn(module, fqn)`` returns False. ``Fp8Linear`` layers
    are left as they are, so ``convert_to_fp8`` followed by this function gives FP8 layers with a
    bf16 head. Already converted layers are skipped (idempotent). Parameters are reused, not
    copied: names, values and identity are unchanged, so state_dict keys stay the same and an
    existing optimizer keeps working. Modules that read a Linear's weight without calling it (e.g.
    ``nn.MultiheadAttention``'s ``out_proj``) keep computing in full precision.
    """
    targets = []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, (Bf16Linear, Fp8Linear)):
            continue
        if module_filter_fn is not None and not module_filter_fn(module, fqn):
            continue
        targets.append(fqn)
    return replace_submodules(model, targets, Bf16Linear.from_linear)


def bf16_autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Real bf16 mixed precision for ``device``: ``torch.autocast("cuda", dtype=torch.bfloat16)``
    on CUDA, a ``contextlib.nullcontext()`` elsewhere (there, use ``convert_to_bf16_emulated``)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
