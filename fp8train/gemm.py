"""FP8 GEMM backends behind one switch: ``fp8_mm(a, b, backend=...)`` computes ``a @ b``.

Both operands are ``Fp8Tensor`` (2-D, a: (M, K), b: (K, N)); the result is high precision with the
two power-of-two scales applied: ``(a.data @ b.data) * a.scale_inv * b.scale_inv``.

- ``emulated``: the FP8 values are exact in fp32, products of two FP8 values are exact in fp32
  (<= 8 significant bits), and the sum accumulates in fp32 -- the numerics of an FP8 tensor core with
  an fp32 accumulator, up to summation order. Never bf16: on CPUs bf16 matmul is ~100x slower and
  would add a rounding per product.
- ``scaled_mm``: ``torch._scaled_mm`` with per-tensor scales. Needs a row-major ``a``, a
  column-major ``b``, K and N multiples of 16 (zero padding here: zeros add nothing to any sum), and
  not both operands E5M2. CUDA sm89+ natively; torch 2.13 also runs it on CPU, which lets the tests
  cross-check it against ``emulated``.
A NaN ``scale_inv`` (how ``ScalingState`` marks an operand whose amax was inf/NaN) makes the whole
output NaN in both backends, zero rows included (0 * NaN = NaN): the overflow reaches the gradients.
Transformer Engine is not a GEMM backend: it replaces whole layers, so it is a converter of its own
(``fp8train.te.convert_to_te``), with its own checkpointed scaling state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fp8train.tensor import Fp8Tensor

__all__ = ["GEMM_BACKENDS", "fp8_mm", "resolve_backend", "supports_scaled_mm"]

GEMM_BACKENDS = ("emulated", "scaled_mm")
_SCALED_MM_ALIGN = 16


def supports_scaled_mm(device: torch.device) -> bool:
    """True where torch._scaled_mm runs on FP8 tensor cores: CUDA compute capability >= 8.9."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Maps "auto" to a concrete GEMM backend for tensors on ``device``."""
    if backend == "auto":
        return "scaled_mm" if supports_scaled_mm(device) else "emulated"
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"GEMM backend={backend!r} is not allowed; allowed values: 'auto', {GEMM_BACKENDS}")
    return backend


def _emulated_mm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    out_fp32 = torch.mm(a.data.to(torch.float32), b.data.to(torch.float32))
    return (out_fp32 * (a.scale_inv * b.scale_inv)).to(out_dtype)


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    pad = (-x.shape[dim]) % multiple
    if pad == 0:
        return x
    # F.pad has no float8 kernels: pad the uint8 view (0x00 is +0.0 in both formats)
    widths = [0, 0, 0, 0]
    widths[3 - 2 * dim] = pad  # F.pad lists the last dim first
    return F.pad(x.view(torch.uint8), widths).view(x.dtype)


def _scaled_mm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    n = b.shape[1]
    # row-major a and column-major b (= row-major b^T): no copy where the operand already has that
    # layout, e.g. a transposed copy written by the cast (Fp8Tensor.data_t)
    a_data = _pad_to(a.data, 1, _SCALED_MM_ALIGN).contiguous()              # (M, K') row-major
    b_t_data = _pad_to(_pad_to(b.t().data, 1, _SCALED_MM_ALIGN), 0, _SCALED_MM_ALIGN)
    b_data = b_t_data.contiguous().t()                                       # (K', N') column-major
    out = torch._scaled_mm(a_data, b_data, scale_a=a.scale_inv, scale_b=b.scale_inv, out_dtype=out_dtype)
    return out[:, :n]


def fp8_mm(a: Fp8Tensor, b: Fp8Tensor, *, backend: str = "auto", out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a @ b`` for FP8 operands, dequantised, in ``out_dtype``."""
    if a.data.dim() != 2 or b.data.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"fp8_mm needs (M, K) @ (K, N) operands, got {tuple(a.shape)} @ {tuple(b.shape)}")
    backend = resolve_backend(backend, a.data.device)
    if backend == "emulated":
        return _emulated_mm(a, b, out_dtype)
    if a.data.dtype == torch.float8_e5m2 and b.data.dtype == torch.float8_e5m2:
        raise ValueError("scaled_mm cannot multiply two E5M2 operands; use backend='emulated'")
    return _scaled_mm(a, b, out_dtype)
