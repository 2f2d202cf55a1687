"""``Fp8Linear``: an ``nn.Linear`` whose three GEMMs run on FP8 operands.

Forward:   y  = x_e4m3 @ w_e4m3^T * (sx^-1 sw^-1) + b          (B..., in) -> (B..., out)
           (fp32 accumulation; y rounded to its output dtype, then + b in that dtype)
Backward:  dx = dy_e5m2 @ w_e4m3 * (sdy^-1 sw^-1)               dgrad, (M, out) @ (out, in)
           dw = dy_e5m2^T @ x_e4m3 * (sdy^-1 sx^-1)             wgrad, (out, M) @ (M, in)
           db = sum(dy) in fp32
Outputs and gradients are high precision: y in the input's dtype (under autocast: the autocast
dtype, e.g. bf16, as ``nn.Linear`` would give), dx in the input's dtype, dw in the weight's dtype.
Autocast never reaches inside: the amax, the casts and the emulated GEMM run as written (an fp32
matmul under autocast would silently become a bf16 one and break the fp32 accumulation).
The weight gradient therefore accumulates across micro-steps in high precision (autograd adds into
``weight.grad``) and is quantized once, at the step boundary, by the gradient communication.
Saved for backward are the FP8 copies of x and w (1 byte per element instead of 2 or 4); for
``torch._scaled_mm``, whose b operand is column-major, the casts also write transposed codes and
the backward keeps x^T and w^T instead (``Fp8Tensor.data_t``): no copy after the cast in dgrad/wgrad.
torch.compile: the casts of x and w (and their scaling-state updates) run in the module's forward,
dy's in the backward; the whole layer traces with no graph break (tests/test_compile.py).
Finer scales (``Fp8Config.granularity`` != "tensor"): the same three GEMMs on operands cast per
row/block along each GEMM's reduction dim, in fp8train/linear_blocks.py (fp8train/blocks.py).
Overflow: an inf/NaN in x, w or dy makes that cast's scale_inv NaN (``ScalingState``), so the GEMMs
using it return NaN (x: y and dw; w: y and dx; dy: dx and dw) although the cast clamped the inf to
fmax: a bias-free layer cannot turn an overflow into finite gradients and a step that is taken.

FP8 primary weights (``fp8_weight=True``; MS-AMP's O3, Transformer Engine's ``fp8_model_init``): the
layer stores its weight as E4M3 codes plus a power-of-two ``scale_inv`` (buffers ``weight_codes``,
``weight_scale_inv``: 1 byte per element), written once per optimizer step by ``set_weight_`` (the
``weight_scaling`` recipe's cast) and read by every forward without a cast. ``weight`` stays the
Parameter that autograd accumulates the high-precision weight gradient into and that optimizers
hold; its value is needed once, to initialise an optimizer's master (``Fp8AdamW(fp8_weights=...)``),
which then releases it (``release_high_precision_``: the Parameter keeps its shape over a single
element of storage). Numerics: with the ``current`` recipe the codes are the very values the
forward's own cast of that weight would give, so a model whose weight equals the master (fp32
parameters) computes bit for bit what it computes with high-precision weights. Finer scales store one
scale_inv per block of the forward layout (``stored_weight_block``; E8M0 for "mx"); "block"'s 128 x 128
cast serves dgrad too, while "rowwise" and "mx" cast the dequantized stored weight again along the other
dim for dgrad (a second rounding of values already on an E4M3 grid, where a high-precision weight is
rounded once: they differ only where the first rounding moved a value onto or across a midpoint of the
coarser grid).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fp8train.blocks import operand_block, resolve_block
from fp8train.config import Fp8Config
from fp8train.formats import E4M3
from fp8train.gemm import fp8_mm
from fp8train.linear_blocks import blocks_linear_forward
from fp8train.scaling_state import ScalingState
from fp8train.tensor import Fp8Tensor
from fp8train.weight_tensor import Fp8WeightTensor, fp8_operand

__all__ = ["Fp8Linear"]

_SCALING_ROLES = ("input_scaling", "weight_scaling", "grad_output_scaling")


class _Fp8LinearFn(torch.autograd.Function):
    """The three GEMMs. x and w arrive already cast (their scaling state is updated by the module's
    forward, outside this function); dy is cast here, in the backward, by ``grad_output_scaling``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, x_fp8: Fp8Tensor,
                w_fp8: Fp8Tensor, layer: Fp8Linear, out_dtype: torch.dtype, dy_has_history: bool) -> torch.Tensor:
        # The GEMM writes the output dtype directly (fp32 accumulation inside); the bias is added
        # in that precision, as nn.Linear does under autocast.
        y_2d = fp8_mm(x_fp8, w_fp8.t(), backend=layer.config.backend, out_dtype=out_dtype)  # (M, out)
        if bias is not None:
            y_2d = y_2d + bias.to(out_dtype)
        # The backward reads x and w only as wgrad's b and dgrad's b, i.e. through x^T and w^T: with
        # transposed copies (scaled_mm) those are saved instead of the row-major codes (same bytes).
        x_saved, w_saved = (x_fp8.data, w_fp8.data) if x_fp8.data_t is None else (x_fp8.data_t, w_fp8.data_t)
        ctx.save_for_backward(x_saved, x_fp8.scale_inv, w_saved, w_fp8.scale_inv)
        ctx.saved_transposed = x_fp8.data_t is not None
        ctx.layer, ctx.dy_has_history = layer, dy_has_history
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y_2d.reshape(*x.shape[:-1], y_2d.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        # backward() may be called inside the forward's autocast region (the trainer does): keep it out
        with torch.autocast(device_type=dy.device.type, enabled=False):
            return _Fp8LinearFn._gradients(ctx, dy)

    @staticmethod
    def _gradients(ctx: Any, dy: torch.Tensor):
        x_data, x_scale_inv, w_data, w_scale_inv = ctx.saved_tensors
        layer: Fp8Linear = ctx.layer
        backend = layer.config.backend
        x_fp8 = Fp8Tensor(data=x_data, scale_inv=x_scale_inv, orig_dtype=ctx.x_dtype)
        w_fp8 = Fp8Tensor(data=w_data, scale_inv=w_scale_inv, orig_dtype=ctx.w_dtype)
        if ctx.saved_transposed:  # saved as x^T, w^T (contiguous): back to (M, in), (out, in) views
            x_fp8, w_fp8 = x_fp8.t(), w_fp8.t()
        dy_2d = dy.reshape(-1, dy.shape[-1])                               # (M, out)
        dy_fp8 = layer.grad_output_scaling.quantize(dy_2d, has_history=ctx.dy_has_history,
                                                     transposed=ctx.saved_transposed)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx_2d = fp8_mm(dy_fp8, w_fp8, backend=backend, out_dtype=ctx.x_dtype)    # (M, in)
            dx = dx_2d.reshape(*dy.shape[:-1], dx_2d.shape[-1])
        if ctx.needs_input_grad[1]:
            dw = fp8_mm(dy_fp8.t(), x_fp8, backend=backend, out_dtype=ctx.w_dtype)  # (out, in)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dy_2d.to(torch.float32).sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would return for ``x`` here: the autocast dtype where autocast is on."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


class Fp8Linear(nn.Linear):
    """Drop-in ``nn.Linear`` (same ``weight`` / ``bias`` parameters and names) computing in FP8.

    Extra state, in the module's ``state_dict``: one ``ScalingState`` per tensor role --
    ``input_scaling`` and ``weight_scaling`` (E4M3), ``grad_output_scaling`` (E5M2 by default).
    A state_dict from a plain ``nn.Linear`` loads too: absent scaling state keeps its initial value.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 config: Fp8Config | None = None, fp8_weight: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if fp8_weight not in (True, False):
            raise ValueError(f"Fp8Linear.fp8_weight={fp8_weight!r} is not allowed; allowed values: True, False")
        self.config = config or Fp8Config()
        state_device = self.weight.device
        self.input_scaling = ScalingState(E4M3, self.config, device=state_device)
        self.weight_scaling = ScalingState(E4M3, self.config, device=state_device)
        self.grad_output_scaling = ScalingState(self.config.grad_output_fp8, self.config, device=state_device)
        self._built_graph = False  # a forward with grad enabled happened (grad_output_scaling.has_history)
        self.fp8_weight = fp8_weight
        if fp8_weight:
            self.register_buffer("weight_codes", torch.zeros(self.weight.shape, dtype=E4M3.dtype, device=state_device))
            self.register_buffer("weight_scale_inv", self._initial_scale_inv(state_device))
            if state_device.type != "meta":
                self.set_weight_(self.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Fp8Config, *, fp8_weight: bool = False) -> Fp8Linear:
        """Wraps ``linear``'s own Parameter objects (no copy), so optimizers and tied references
        that hold them stay valid. ``fp8_weight``: also store the weight in FP8 (module docstring),
        quantized from its current value."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    config=config, fp8_weight=fp8_weight, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        device = linear.weight.device
        for role in _SCALING_ROLES:
            setattr(layer, role, getattr(layer, role).to_empty(device=device))
        layer._reset_scaling_state()
        if fp8_weight:
            layer.weight_codes = torch.zeros(layer.weight.shape, dtype=E4M3.dtype, device=device)
            layer.weight_scale_inv = layer._initial_scale_inv(device)
            layer.set_weight_(layer.weight)
        return layer

    def _reset_scaling_state(self) -> None:
        fresh = {role: ScalingState(getattr(self, role).fmt, self.config, device=self.weight.device)
                 for role in _SCALING_ROLES}
        for role, state in fresh.items():
            getattr(self, role).load_state_dict(state.state_dict())
            getattr(self, role).reset_stats()  # non-persistent: not in the state_dict

    def extra_repr(self) -> str:
        fp8_weight = ", fp8_weight=True" if self.fp8_weight else ""
        granularity = "" if self.config.granularity == "tensor" else f", granularity={self.config.granularity}"
        return (f"{super().extra_repr()}, recipe={self.config.recipe}, backend={self.config.backend}"
                f"{granularity}{fp8_weight}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = _output_dtype(x)
        transposed = self._wants_transposes(x.device)
        weight = self._weight_out_in()                                                                # (out, in)
        if self.config.granularity != "tensor":  # finer scales: fp8train/linear_blocks.py
            with torch.autocast(device_type=x.device.type, enabled=False):
                return blocks_linear_forward(self, x, weight, out_dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_fp8 = self.input_scaling.quantize(x.reshape(-1, x.shape[-1]), transposed=transposed)   # (M, in)
            if self.fp8_weight:  # stored codes: no cast (the transposed layout is a 1-byte copy)
                w_fp8 = self.stored_fp8_weight(transposed=transposed)
            elif isinstance(weight, Fp8WeightTensor):  # FSDP2's gathered FP8 primary weight: no cast either
                w_fp8 = fp8_operand(weight, transposed=transposed)
            else:
                w_fp8 = self.weight_scaling.quantize(weight, transposed=transposed)                   # (out, in)
            return _Fp8LinearFn.apply(x, weight, self.bias, x_fp8, w_fp8, self, out_dtype,
                                      self._dy_has_history())

    def _weight_out_in(self) -> torch.Tensor:
        """The weight as the GEMMs' (out, in) operand: ``weight`` (Fp8Conv1D: a transposed view)."""
        return self.weight

    def _wants_transposes(self, device: torch.device) -> bool:
        """Whether the casts also write transposed codes: for ``torch._scaled_mm`` (explicitly, or
        ``auto`` on CUDA), whose column-major b would otherwise be a copy after the cast in dgrad
        and wgrad. The emulated fp32 GEMM reads any layout."""
        return self.config.backend == "scaled_mm" or (self.config.backend == "auto" and device.type == "cuda")

    def _dy_has_history(self) -> bool:
        """Whether the backward of this forward casts its output gradient with the delayed recipe's
        stored scale alone (one pass; ScalingState.quantize). That cast happens in the backward,
        where a Python flag cannot change under torch.compile, so the forward decides: from the
        second forward that builds a graph on, a backward has (normally) cast an output gradient
        already. Should none have (a graph dropped without backward), that first cast uses the
        stored initial bias instead of its own amax. Flags that flip once: each costs one recompile."""
        if self.config.recipe != "delayed" or not torch.is_grad_enabled():
            return False
        has_history = self._built_graph or self.grad_output_scaling.has_history
        self._built_graph = True
        return has_history

    # ---- FP8 primary weights (fp8_weight=True) ---------------------------------------------------

    def stored_weight_block(self) -> tuple[int, int] | None:
        """The (rows, cols) one stored scale covers: the forward layout of ``Fp8Config.granularity``
        (fp8train/blocks.py; resolved, no 0), or None for one per-tensor scale."""
        if self.config.granularity == "tensor":
            return None
        return resolve_block(operand_block(self.config.granularity, "weight", 1), self.weight.shape)

    def _initial_scale_inv(self, device: torch.device | str) -> torch.Tensor:
        """``weight_scale_inv`` before the first cast: ones, 0-d or one per block (E8M0 for "mx")."""
        block = self.stored_weight_block()
        if block is None:
            return torch.ones((), dtype=torch.float32, device=device)
        grid = (-(-self.weight.shape[0] // block[0]), -(-self.weight.shape[1] // block[1]))
        dtype = torch.float8_e8m0fnu if self.weight_scaling.e8m0_scales else torch.float32
        return torch.ones(grid, dtype=torch.float32, device=device).to(dtype)

    def stored_fp8_weight(self, *, transposed: bool = False) -> Fp8Tensor:
        """The stored weight (codes and scale_inv, no copy; ``transposed``: plus a transposed copy, per
        tensor only: the finer-scale GEMMs read any layout)."""
        self._require_fp8_weight("stored_fp8_weight")
        codes, block = self.weight_codes, self.stored_weight_block()
        return Fp8Tensor(data=codes, scale_inv=self.weight_scale_inv, orig_dtype=self.weight.dtype, block=block,
                         data_t=codes.t().contiguous() if transposed and block is None else None)

    @torch.no_grad()
    def set_weight_(self, weight_hp: torch.Tensor) -> None:
        """Store ``weight_hp`` (the layer's shape, any float dtype) as E4M3 with ``weight_scaling``'s
        recipe, exactly the cast the forward applies to a high-precision weight (its history and
        counters advance as that cast's would; a non-finite amax keeps the previous scale)."""
        self._require_fp8_weight("set_weight_")
        if weight_hp.shape != self.weight_codes.shape:
            raise ValueError(f"Fp8Linear.set_weight_: shape {tuple(weight_hp.shape)}, expected "
                             f"{tuple(self.weight_codes.shape)}")
        block = self.stored_weight_block()
        if block is None:
            w_fp8 = self.weight_scaling.quantize(weight_hp.detach())
            previous = torch.exp2(-self.weight_scaling.log2_scale)
        else:  # one scale per block of the forward layout, the cast the forward would apply
            previous = self.weight_scale_inv.to(torch.float32)
            w_fp8 = self.weight_scaling.quantize_blocks(weight_hp.detach(), block)
        new = w_fp8.scale_inv.to(torch.float32)  # NaN where the weight overflowed: keep the previous scale
        self.weight_codes.copy_(w_fp8.data)
        self.weight_scale_inv.copy_(torch.where(torch.isfinite(new), new, previous))

    @torch.no_grad()
    def set_fp8_weight_(self, codes: torch.Tensor, scale_inv: torch.Tensor) -> None:
        """Store codes made elsewhere (a ZeRO owner's, received in an all-gather), bit for bit; the
        weight role's state records that cast (the amax of the weight the GEMMs use, max|code| *
        scale_inv, and its scaling bias), so that monitoring reads what it would on the owner."""
        self._require_fp8_weight("set_fp8_weight_")
        self.weight_codes.copy_(codes.view(self.weight_codes.shape))
        self.weight_scale_inv.copy_(scale_inv.view(self.weight_scale_inv.shape))
        amax = self.dequantized_weight(torch.float32).abs().amax()
        # the tensor's bias: its largest block's (per tensor: its only one), as the owner's cast recorded
        self.weight_scaling.record_cast_(amax, -torch.log2(self.weight_scale_inv.to(torch.float32).max()))

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the GEMMs use: the stored codes times scale_inv (fp8_weight), else ``weight``."""
        if not self.fp8_weight:
            return self.weight.detach().to(dtype or self.weight.dtype)
        return self.stored_fp8_weight().dequantize(dtype or self.weight.dtype)

    @property
    def holds_high_precision_weight(self) -> bool:
        """Whether ``weight`` still has its own values (before ``release_high_precision_``)."""
        return self.weight.stride() != (0,) * self.weight.dim() or self.weight.numel() <= 1

    @property
    def high_precision_weight(self) -> torch.Tensor:
        """``weight``, while it holds values (``holds_high_precision_weight``): where a master starts."""
        return self.weight

    @torch.no_grad()
    def release_high_precision_(self) -> None:
        """Drop ``weight``'s values (its master now lives in the optimizer): the Parameter keeps its
        shape, dtype, device, identity and gradient over a single element of storage."""
        self._require_fp8_weight("release_high_precision_")
        w = self.weight
        w.data = torch.zeros((), dtype=w.dtype, device=w.device).expand(w.shape)

    def _require_fp8_weight(self, what: str) -> None:
        if not self.fp8_weight:
            raise RuntimeError(f"Fp8Linear.{what} needs fp8_weight=True (this layer keeps a high-precision weight)")

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.fp8_weight:  # the codes and scale_inv are the weight; the Parameter is a gradient handle
            destination.pop(f"{prefix}weight", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # A state_dict from a high-precision model has no scaling state for this layer at all:
        # fill in the current (initial) values so that strict loading succeeds. A state_dict that
        # has some of it is loaded as is, so a truncated FP8 checkpoint still fails loudly.
        scaling_prefixes = tuple(f"{prefix}{role}." for role in _SCALING_ROLES)
        if not any(key.startswith(scaling_prefixes) for key in state_dict):
            for role in _SCALING_ROLES:
                for name, buf in getattr(self, role).state_dict().items():  # persistent buffers only
                    state_dict[f"{prefix}{role}.{name}"] = buf.detach().clone()
        weight_key, codes_key, scale_key = (f"{prefix}{k}" for k in ("weight", "weight_codes", "weight_scale_inv"))
        weight_hp = None
        if self.fp8_weight and weight_key in state_dict:
            weight_hp = self._take_high_precision_weight(state_dict, weight_key, codes_key, scale_key)
        elif not self.fp8_weight and weight_key not in state_dict and codes_key in state_dict:
            # an FP8-weight checkpoint into a high-precision layer: the weight it computed with
            codes, scale_inv = state_dict.pop(codes_key), state_dict.pop(scale_key)
            block = None if scale_inv.dim() == 0 else self.stored_weight_block()
            state_dict[weight_key] = Fp8Tensor(data=codes, scale_inv=scale_inv, orig_dtype=torch.float32,
                                               block=block).dequantize()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.fp8_weight and weight_key in missing_keys:  # the handle holds no value to load
            missing_keys.remove(weight_key)
        if weight_hp is not None:  # after the scaling state loaded: the cast advances it from there
            self.set_weight_(weight_hp)

    def _take_high_precision_weight(self, state_dict, weight_key: str, codes_key: str,
                                    scale_key: str) -> torch.Tensor | None:
        """A high-precision weight (a pre-conversion or fp8_weight=False state_dict), taken out of
        ``state_dict``: copied into ``weight`` while that still holds values (for an optimizer's
        master to start from) and returned to be cast into the codes once the scaling state loaded,
        unless the state_dict has codes of its own. None (left in place) on a shape mismatch, which
        torch then reports as for any parameter."""
        weight = state_dict[weight_key]
        if weight.shape != self.weight.shape:
            return None
        del state_dict[weight_key]
        weight = weight.to(self.weight.device)
        if self.holds_high_precision_weight:
            with torch.no_grad():
                self.weight.copy_(weight)
        if codes_key in state_dict:
            return None
        state_dict[codes_key], state_dict[scale_key] = self.weight_codes, self.weight_scale_inv  # placeholders
        return weight
