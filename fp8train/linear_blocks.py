"""``Fp8Linear``'s three GEMMs with finer scales (``Fp8Config.granularity`` rowwise / block / mx).

Each operand is cast along the reduction dim of the GEMM it feeds (fp8train/blocks.py):
    forward  y  = x_K  @ w_K^T               x (M, K) along K, w (N, K) along K
    dgrad    dx = dy_N @ w_N                 dy along N, w along N (for "block": the same 128x128 cast)
    wgrad    dw = dy_M^T @ x_M               dy along M, x along M
x and w are cast in the module's forward (their ``ScalingState``s updated there, recipe "current");
the forward saves only the FP8 copies the backward reads (x along M, w along N: 1 byte per element
each), and casts them only when that gradient is wanted. dy is cast in the backward, once per GEMM
that needs it. Overflow: a non-finite x, w or dy makes every scale_inv of that cast NaN, so every
GEMM using it returns NaN (the per-tensor policy, fp8train/linear.py). torch.compile of this path is
not tested (the per-tensor path's is).
"""

from __future__ import annotations

from typing import Any

import torch

from fp8train.blocks import operand_block
from fp8train.gemm import fp8_mm
from fp8train.tensor import Fp8Tensor

# ``layer`` below is an ``Fp8Linear`` (fp8train/linear.py, the next layer up, which calls this module):
# typed as nn.Module so that this module imports nothing above it (tests/test_import_graph.py)

__all__ = ["blocks_linear_forward"]


def _cast(layer: torch.nn.Module, role: str, x_2d: torch.Tensor, dim: int) -> Fp8Tensor:
    block = operand_block(layer.config.granularity, role, dim)
    return getattr(layer, f"{role}_scaling").quantize_blocks(x_2d, block)


def blocks_linear_forward(layer: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """The layer's output for ``x`` (B..., in), casting x and ``weight`` (out, in; the layer's own
    or a transposed view of it) per block; autocast is off here."""
    x_2d = x.reshape(-1, x.shape[-1])                                      # (M, K)
    grad = torch.is_grad_enabled()
    x_fwd = _cast(layer, "input", x_2d, 1)
    # FP8 primary weights: the stored codes ARE the forward layout's cast (``Fp8Linear.set_weight_``)
    w_fwd = layer.stored_fp8_weight() if layer.fp8_weight else _cast(layer, "weight", weight, 1)
    x_wgrad = _cast(layer, "input", x_2d, 0) if grad and weight.requires_grad else None
    if not (grad and x.requires_grad):
        w_dgrad = None
    elif layer.config.granularity == "block":
        w_dgrad = w_fwd                                                    # 128x128: one cast serves both
    else:  # the other layout; from FP8 primary weights a second rounding, of the stored values
        w_dgrad = _cast(layer, "weight", layer.dequantized_weight() if layer.fp8_weight else weight, 0)
    return _Fp8BlocksLinearFn.apply(x, weight, layer.bias, x_fwd, w_fwd, x_wgrad, w_dgrad, layer, out_dtype)


def _saved(t: Fp8Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (None, None) if t is None else (t.data, t.scale_inv)


class _Fp8BlocksLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, x_fwd: Fp8Tensor,
                w_fwd: Fp8Tensor, x_wgrad: Fp8Tensor | None, w_dgrad: Fp8Tensor | None, layer: torch.nn.Module,
                out_dtype: torch.dtype) -> torch.Tensor:
        y_2d = fp8_mm(x_fwd, w_fwd.t(), backend=layer.config.backend, out_dtype=out_dtype)  # (M, N)
        if bias is not None:
            y_2d = y_2d + bias.to(out_dtype)
        ctx.save_for_backward(*_saved(x_wgrad), *_saved(w_dgrad))
        ctx.blocks = (None if x_wgrad is None else x_wgrad.block, None if w_dgrad is None else w_dgrad.block)
        ctx.layer, ctx.x_dtype, ctx.w_dtype = layer, x.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y_2d.reshape(*x.shape[:-1], y_2d.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        with torch.autocast(device_type=dy.device.type, enabled=False):
            return _Fp8BlocksLinearFn._gradients(ctx, dy)

    @staticmethod
    def _gradients(ctx: Any, dy: torch.Tensor):
        x_data, x_scale_inv, w_data, w_scale_inv = ctx.saved_tensors
        layer: torch.nn.Module = ctx.layer
        backend = layer.config.backend
        dy_2d = dy.reshape(-1, dy.shape[-1])                                # (M, N)
        dx = dw = db = None
        if ctx.needs_input_grad[0] and w_data is not None:
            w_dgrad = Fp8Tensor(data=w_data, scale_inv=w_scale_inv, orig_dtype=ctx.w_dtype, block=ctx.blocks[1])
            dy_dgrad = _cast(layer, "grad_output", dy_2d, 1)
            dx_2d = fp8_mm(dy_dgrad, w_dgrad, backend=backend, out_dtype=ctx.x_dtype)   # (M, K)
            dx = dx_2d.reshape(*dy.shape[:-1], dx_2d.shape[-1])
        if ctx.needs_input_grad[1] and x_data is not None:
            x_wgrad = Fp8Tensor(data=x_data, scale_inv=x_scale_inv, orig_dtype=ctx.x_dtype, block=ctx.blocks[0])
            dy_wgrad = _cast(layer, "grad_output", dy_2d, 0)
            dw = fp8_mm(dy_wgrad.t(), x_wgrad, backend=backend, out_dtype=ctx.w_dtype)  # (N, K)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dy_2d.to(torch.float32).sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None, None
