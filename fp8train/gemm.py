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
Finer scales (``Fp8Tensor.block`` set, ``Fp8Config.granularity``; each operand scaled along K):
- ``emulated`` dequantizes both operands (codes x power-of-two scale per block: exact in fp32) and
  runs one fp32 matmul: a scale that varies along K cannot be factored out of the sum, and this is
  the same fp32 accumulation of exact products as per tensor.
- natively (``select_gemm``, a pure function of layouts, dtypes and device capability, so tested on
  CPU): rowwise x rowwise runs ``torch._scaled_mm`` with fp32 scale vectors, (M, 1) and (1, N), on
  CUDA sm90+ (H100/H200 and B200) for E4M3 x E4M3 with a bf16 output, and on CPU when asked
  (``backend="scaled_mm"``; torch 2.13 runs it); everything else is emulated: the 1x128/128x128 blocks
  (torch's blockwise scaled_mm, sm90, is not wired in) and MX (E8M0 blocks of 32: Blackwell-only
  tensor cores, sm100, need swizzled scale layouts; not wired in either). The CUDA paths are not
  verified here (no GPU in this project's tests).
A NaN ``scale_inv`` (how ``ScalingState`` marks an operand whose amax was inf/NaN) makes the whole
output NaN in both backends, zero rows included (0 * NaN = NaN): the overflow reaches the gradients.
Transformer Engine is not a GEMM backend: it replaces whole layers, so it is a converter of its own
(``fp8train.te.convert_to_te``), with its own checkpointed scaling state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fp8train.tensor import Fp8Tensor

__all__ = ["GEMM_BACKENDS", "GEMM_ENGINES", "fp8_mm", "resolve_backend", "select_gemm", "supports_scaled_mm"]

GEMM_BACKENDS = ("emulated", "scaled_mm")
GEMM_ENGINES = ("emulated", "scaled_mm", "scaled_mm_rowwise")
_SCALED_MM_ALIGN = 16
_ROWWISE_MIN_CAPABILITY = (9, 0)  # torch's rowwise-scaled FP8 GEMM: Hopper (sm90) and later


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


def select_gemm(a_kind: str, b_kind: str, a_dtype: torch.dtype, b_dtype: torch.dtype, out_dtype: torch.dtype,
                *, backend: str, device_type: str, capability: tuple[int, int] | None) -> str:
    """The engine (one of ``GEMM_ENGINES``) for operands scaled per ``a_kind`` / ``b_kind`` ("tensor",
    "rowwise", "block", "mx") on a device of ``device_type`` and CUDA ``capability`` (None elsewhere).
    Per tensor: ``scaled_mm`` where ``resolve_backend`` says so. Rowwise: ``scaled_mm_rowwise`` with
    ``backend="scaled_mm"``, or ``"auto"`` on CUDA sm90+ with a bf16 output (what torch's rowwise
    kernels produce), both E4M3. Blocks and MX: emulated (module docstring)."""
    if backend not in ("auto", *GEMM_BACKENDS):
        raise ValueError(f"GEMM backend={backend!r} is not allowed; allowed values: 'auto', {GEMM_BACKENDS}")
    if a_kind == "tensor" and b_kind == "tensor":
        if backend == "auto":
            native = device_type == "cuda" and capability is not None and capability >= (8, 9)
            return "scaled_mm" if native else "emulated"
        return backend
    e4m3 = a_dtype == torch.float8_e4m3fn and b_dtype == torch.float8_e4m3fn
    if a_kind == b_kind == "rowwise" and e4m3 and backend != "emulated":
        if backend == "scaled_mm":
            return "scaled_mm_rowwise"
        cuda_native = device_type == "cuda" and capability is not None and capability >= _ROWWISE_MIN_CAPABILITY
        if cuda_native and out_dtype == torch.bfloat16:
            return "scaled_mm_rowwise"
    return "emulated"


def _operand_kind(x: Fp8Tensor, reduce_dim: int) -> str:
    """How ``x`` is scaled for a GEMM that reduces its ``reduce_dim``."""
    if x.block is None:
        return "tensor"
    if x.scale_inv.dtype == torch.float8_e8m0fnu:
        return "mx"
    whole = (1, x.shape[1]) if reduce_dim == 1 else (x.shape[0], 1)
    return "rowwise" if tuple(x.block) == whole else "block"


def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _emulated_blocks_mm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    # codes x power-of-two scale is exact in fp32 (both operands); the products of two such values
    # are exact in fp32 and summed in fp32, as per tensor: the scales just enter before the sum
    return torch.mm(a.dequantize(torch.float32), b.dequantize(torch.float32)).to(out_dtype)


def _scaled_mm_rowwise(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    n = b.shape[1]
    a_data = _pad_to(a.data, 1, _SCALED_MM_ALIGN).contiguous()               # (M, K') row-major
    b_t_data = _pad_to(_pad_to(b.data.t(), 1, _SCALED_MM_ALIGN), 0, _SCALED_MM_ALIGN)
    b_data = b_t_data.contiguous().t()                                       # (K', N') column-major
    scale_a = a.scale_inv.to(torch.float32).reshape(-1, 1).contiguous()      # (M, 1)
    scale_b = F.pad(b.scale_inv.to(torch.float32).reshape(1, -1), (0, b_data.shape[1] - n), value=1.0)  # (1, N')
    out = torch._scaled_mm(a_data, b_data, scale_a=scale_a, scale_b=scale_b.contiguous(), out_dtype=out_dtype)
    return out[:, :n]


def fp8_mm(a: Fp8Tensor, b: Fp8Tensor, *, backend: str = "auto", out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a @ b`` for FP8 operands, dequantised, in ``out_dtype``."""
    if a.data.dim() != 2 or b.data.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"fp8_mm needs (M, K) @ (K, N) operands, got {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.block is not None or b.block is not None:  # finer scales (module docstring)
        device = a.data.device
        engine = select_gemm(_operand_kind(a, 1), _operand_kind(b, 0), a.data.dtype, b.data.dtype, out_dtype,
                             backend=backend, device_type=device.type, capability=_capability(device))
        if engine == "scaled_mm_rowwise":
            return _scaled_mm_rowwise(a, b, out_dtype)
        return _emulated_blocks_mm(a, b, out_dtype)
    backend = resolve_backend(backend, a.data.device)
    if backend == "emulated":
        return _emulated_mm(a, b, out_dtype)
    if a.data.dtype == torch.float8_e5m2 and b.data.dtype == torch.float8_e5m2:
        raise ValueError("scaled_mm cannot multiply two E5M2 operands; use backend='emulated'")
    return _scaled_mm(a, b, out_dtype)
