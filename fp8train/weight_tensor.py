"""``Fp8WeightTensor``: a weight stored as E4M3 codes and one power-of-two ``scale_inv``, that reports
its high-precision dtype (bf16 / fp32) to everything that asks: the FP8 primary weight of a layer whose
storage FSDP2 manages (fp8train/comm/fsdp_fp8_weights.py).

Why a tensor subclass (fp8train/tensor.py's ``Fp8Tensor`` is a plain container): FSDP2 shards, pads and
all-gathers a parameter itself, and hands an all-gather to the parameter's own ``fsdp_pre_all_gather`` /
``fsdp_post_all_gather`` only when the parameter is a tensor with those methods. Stock FSDP2 cannot hold a
float8 parameter (it casts each reduced gradient to the parameter's dtype, and wants one dtype per
parameter group), so the parameter reports the model's dtype and keeps the codes inside:
  - the sharded parameter (FSDP2's DTensor) holds 1 byte per element of its shard;
  - the all-gather sends those bytes (``fsdp_pre_all_gather``: the codes as uint8, the scale_inv as
    metadata: every shard of a tensor is stored at the same, mesh-agreed scale) and the gathered weight
    is again an ``Fp8WeightTensor``, whose codes ``Fp8Linear`` multiplies without a cast (``fp8_operand``);
  - its gradient is a plain tensor of the reported dtype (autograd and FSDP2's reduce-scatter see a
    bf16 / fp32 parameter); the optimizer writes the new weight through fp8train/comm/fsdp_fp8_weights.py.

Operators (``__torch_dispatch__``), the set FSDP2, DTensor and the optimizer apply to a parameter:
  - views and splits (view, as_strided, slice, split, detach, ...) act on the codes and share scale_inv;
  - ``new_zeros`` / ``new_empty`` give an ``Fp8WeightTensor`` (FSDP2 pads a shard with them);
  - ``zeros_like`` / ``empty_like`` / ``ones_like`` give a PLAIN tensor (a gradient or an optimizer
    state is not a weight);
  - ``copy_`` between two copies the codes and scale_inv; from a plain tensor (a checkpoint being
    loaded) it casts with a scale from that tensor's own amax: exact for values that already lie on a
    coarser E4M3 grid (a dequantized FP8 weight), and the caller re-agrees the scale over the mesh after
    (``Fp8ShardedWeights.requantize_``); into a plain tensor it writes the dequantized values;
  - every other out-of-place operator sees the dequantized values (code * scale_inv, exact, then rounded
    once to the reported dtype); an in-place or ``out=`` operator other than ``copy_`` raises, since it
    would silently write a temporary.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fp8train.cast import cast_to_fp8
from fp8train.formats import E4M3
from fp8train.scaling import amax_to_log2_scale, tensor_to_amax
from fp8train.tensor import Fp8Tensor

__all__ = ["Fp8WeightTensor", "fp8_operand"]

aten = torch.ops.aten

# operators whose result is a view (or the one tensor list of views) of the codes; scale_inv is shared
_VIEW_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.as_strided.default, aten.slice.Tensor, aten.narrow.default,
    aten.detach.default, aten.alias.default, aten.t.default, aten.transpose.int, aten.reshape.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unsafe_split.Tensor,
    aten.clone.default, aten._to_copy.default, aten.contiguous.default,
}
_NEW_OPS = {aten.new_zeros.default, aten.new_empty.default, aten.new_empty_strided.default}
_LIKE_OPS = {aten.zeros_like.default, aten.empty_like.default, aten.ones_like.default}


class Fp8WeightTensor(torch.Tensor):
    """E4M3 ``codes`` (any shape) and a 0-d fp32 ``scale_inv`` (a power of two), seen as a tensor of
    ``dtype``: value = code * scale_inv (module docstring)."""

    _codes: torch.Tensor
    _scale_inv: torch.Tensor
    # every operator goes to __torch_dispatch__; nothing is rewrapped at the Python level
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> Fp8WeightTensor:
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, strides=codes.stride(),
                                                   storage_offset=codes.storage_offset(), dtype=dtype,
                                                   device=codes.device, requires_grad=False)

    def __init__(self, codes: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> None:
        if codes.dtype != E4M3.dtype:
            raise ValueError(f"Fp8WeightTensor: codes must be {E4M3.dtype}, got {codes.dtype}")
        if scale_inv.dim() != 0 or scale_inv.dtype != torch.float32:
            raise ValueError(f"Fp8WeightTensor: scale_inv must be a 0-d float32 tensor, got {scale_inv.dtype} "
                             f"of shape {tuple(scale_inv.shape)}")
        self._codes, self._scale_inv = codes, scale_inv

    @classmethod
    def from_high_precision(cls, weight: torch.Tensor, log2_scale: torch.Tensor) -> Fp8WeightTensor:
        """``weight`` cast to E4M3 at ``2 ** log2_scale``, reporting ``weight``'s dtype."""
        scale = torch.exp2(log2_scale.to(torch.float32))
        return cls(cast_to_fp8(weight.detach(), scale, E4M3), (1.0 / scale).reshape(()), weight.dtype)

    def __repr__(self) -> str:  # no values: they may be fake (torch.compile logs reprs while tracing)
        return f"Fp8WeightTensor(shape={tuple(self.shape)}, dtype={self.dtype}, codes={self._codes.dtype})"

    # ---- what the project reads ------------------------------------------------------------------

    @property
    def codes(self) -> torch.Tensor:
        return self._codes

    @property
    def scale_inv(self) -> torch.Tensor:
        return self._scale_inv

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """code * scale_inv in fp32 (exact), rounded once to ``dtype`` (default: the reported dtype)."""
        return (self._codes.to(torch.float32) * self._scale_inv).to(dtype or self.dtype)

    @torch.no_grad()
    def store_(self, values: torch.Tensor, log2_scale: torch.Tensor) -> None:
        """Write ``values`` (this tensor's shape) cast at ``2 ** log2_scale``, in place."""
        scale = torch.exp2(log2_scale.to(torch.float32))
        cast_to_fp8(values.detach().contiguous(), scale, E4M3, out=self._codes)
        self._scale_inv.copy_(1.0 / scale)

    # ---- torch.compile / FSDP2 -------------------------------------------------------------------

    def __tensor_flatten__(self) -> tuple[list[str], torch.dtype]:
        return ["_codes", "_scale_inv"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], dtype: torch.dtype, outer_size: Any,
                             outer_stride: Any) -> Fp8WeightTensor:
        return Fp8WeightTensor(inner["_codes"], inner["_scale_inv"], dtype)

    def fsdp_pre_all_gather(self, mesh: Any, outer_size: Any, outer_stride: Any, module: Any,
                            mp_policy: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The bytes FSDP2 all-gathers: this shard's codes (every shard has the same scale_inv), padded to
        ceil(rows / N) rows as FSDP2 wants them. FSDP2 made the shard a view of its padded buffer
        (``new_zeros`` then ``narrow``), whose padding rows stay zero: the padded view is that buffer."""
        codes = self._codes
        rows = -(-outer_size[0] // mesh.size())
        if codes.shape[0] != rows:
            padded = (rows, *codes.shape[1:])
            numel = math.prod(padded)
            if codes.is_contiguous() and codes.untyped_storage().nbytes() >= codes.storage_offset() + numel:
                codes = codes.as_strided(padded, torch.empty(padded, device="meta").stride(), codes.storage_offset())
            else:  # not FSDP2's buffer (e.g. a shard loaded by hand): pad a copy
                codes = torch.cat([codes, codes.new_zeros((rows - codes.shape[0], *codes.shape[1:]))])
        return (codes.view(torch.uint8),), self._scale_inv

    def fsdp_post_all_gather(self, all_gather_outputs: tuple[torch.Tensor, ...], metadata: torch.Tensor,
                             param_dtype: torch.dtype, *, out: torch.Tensor | None = None
                             ) -> tuple[Fp8WeightTensor, tuple[torch.Tensor, ...]] | None:
        """The gathered weight: an ``Fp8WeightTensor`` over the gathered bytes (FSDP2 trims the padding
        rows with ``as_strided``). Later gathers refill the same bytes and copy the scale into ``out``."""
        (data,) = all_gather_outputs
        if out is not None:
            # refilled in place, as FSDP2 refills the codes: a compiled backward may have saved this very
            # tensor (its forward's value, which the re-gather restores), so the version counter stays
            with torch.autograd._unsafe_preserve_version_counter(out._scale_inv):
                out._scale_inv.copy_(metadata)
            return None
        return Fp8WeightTensor(data.view(E4M3.dtype), metadata.clone(), param_dtype), (data,)

    # ---- operators -------------------------------------------------------------------------------

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _VIEW_OPS and isinstance(args[0], Fp8WeightTensor):
            self = args[0]
            if func is aten._to_copy.default and kwargs.get("dtype", self.dtype) != self.dtype:
                return self.dequantize(kwargs["dtype"]).to(kwargs.get("device") or self.device)
            kwargs = {k: v for k, v in kwargs.items() if k not in ("dtype", "layout", "memory_format")} \
                if func is aten._to_copy.default else kwargs
            out = func(self._codes, *args[1:], **kwargs)
            scale_inv = self._scale_inv.to(out.device if torch.is_tensor(out) else self._scale_inv.device)
            if func in (aten.clone.default, aten._to_copy.default):
                scale_inv = scale_inv.clone()
            wrap = lambda codes: Fp8WeightTensor(codes, scale_inv, self.dtype)  # noqa: E731
            return [wrap(c) for c in out] if isinstance(out, (list, tuple)) else wrap(out)
        if func in _NEW_OPS and isinstance(args[0], Fp8WeightTensor):
            self = args[0]
            if kwargs.get("dtype", self.dtype) != self.dtype:  # another dtype asked for: a plain tensor
                return func(self._codes, *args[1:], **kwargs)
            kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
            codes = func(self._codes, *args[1:], **kwargs)
            return Fp8WeightTensor(codes, self._scale_inv.clone(), self.dtype)
        if func in _LIKE_OPS:
            self = args[0]
            return func(torch.empty(self.shape, dtype=self.dtype, device=self.device), *args[1:], **kwargs)
        if func is aten.copy_.default:
            return _copy_(*args, **kwargs)
        if func._schema.is_mutable or any(a.alias_info is not None and a.alias_info.is_write
                                          for a in func._schema.returns):
            raise NotImplementedError(f"Fp8WeightTensor: in-place operator {func} is not supported (it would "
                                      "write a dequantized temporary); write a new weight with store_")
        return func(*_dequantized(args), **dict(zip(kwargs, _dequantized(tuple(kwargs.values())))))


def _dequantized(values: tuple) -> list:
    """``values`` with every ``Fp8WeightTensor`` (also inside a list or tuple: an operator's tensor list)
    replaced by its dequantized values."""
    def plain(v: Any) -> Any:
        if isinstance(v, Fp8WeightTensor):
            return v.dequantize()
        return type(v)(plain(x) for x in v) if isinstance(v, (list, tuple)) else v
    return [plain(v) for v in values]


def fp8_operand(weight: Fp8WeightTensor, *, transposed: bool = False) -> Fp8Tensor:
    """``weight`` as a GEMM operand, no copy of the codes (``transposed``: plus a transposed copy, for
    ``torch._scaled_mm``). scale_inv is a copy: FSDP2 refreshes it in place at the next gather, and a
    backward must see the value its forward used. A function, not a method: torch.compile traces a
    tensor method returning a non-tensor as one opaque call, which it cannot."""
    codes = weight._codes
    return Fp8Tensor(data=codes, scale_inv=weight._scale_inv.clone(), orig_dtype=weight.dtype,
                     data_t=codes.t().contiguous() if transposed else None)


@torch.no_grad()
def _copy_(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    if isinstance(dst, Fp8WeightTensor) and isinstance(src, Fp8WeightTensor):
        dst._codes.copy_(src._codes)
        dst._scale_inv.copy_(src._scale_inv)
    elif isinstance(dst, Fp8WeightTensor):
        # a plain source (a checkpoint's values): its own amax's scale (module docstring)
        src = src.to(dst.device)
        dst.store_(src, amax_to_log2_scale(tensor_to_amax(src), E4M3, prev_log2_scale=-torch.log2(dst._scale_inv)))
    else:
        dst.copy_(src.dequantize(dst.dtype))
    return dst
