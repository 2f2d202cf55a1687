"""The FP8 cast as one hand-written Triton kernel: reads x_hp once and writes the FP8 codes of
``clamp(x_fp32 * scale, -fmax, fmax)`` (``cast_to_fp8_reference``'s contract, bit for bit),
optionally the same codes transposed (the wgrad GEMM's column-major operand, no copy after the
cast) and optionally ``tensor_to_amax(x_hp)``. An eager cast on a GPU is ~10 kernel launches.

Triton is imported lazily (``import fp8train`` must work, and stay fast, without it): the kernel
lives in ``_cast_triton_kernel``, loaded on the first launch. No host synchronisation: the scale is
read on the device, the amax is accumulated there. The numerical decisions are in the kernel's module.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from fp8train.formats import Fp8Format, as_fp8_format

__all__ = ["triton_cast_into", "triton_cast_supported"]

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # finds, does not import


def _device_supported(device: torch.device) -> bool:
    if device.type == "cpu":  # Triton's interpreter runs kernels on the CPU (numpy), for tests
        return os.environ.get("TRITON_INTERPRET") == "1"
    # Triton converts to fp8e4nv in hardware from sm89 (Ada, Hopper) on; ROCm's FP8 is another story
    return (device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device) >= (8, 9))


def triton_cast_supported(x_hp: torch.Tensor) -> bool:
    """Whether ``triton_cast_into`` takes ``x_hp``: triton installed, x on a CUDA device of compute
    capability >= 8.9 (or on the CPU with TRITON_INTERPRET=1), fp32/bf16/fp16, contiguous, 1-D or 2-D."""
    return (x_hp.dtype in _INPUT_DTYPES and x_hp.dim() in (1, 2) and x_hp.is_contiguous()
            and _device_supported(x_hp.device) and _triton_installed())


def _describe(t: torch.Tensor) -> str:
    layout = "contiguous" if t.is_contiguous() else "non-contiguous"
    return f"a {layout} {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {shape} on {device}; "
                         f"got {_describe(t)}")


def triton_cast_into(x_hp: torch.Tensor, scale: torch.Tensor, fmt: Fp8Format | torch.dtype | str,
                     out: torch.Tensor, *, out_t: torch.Tensor | None = None,
                     amax_out: torch.Tensor | None = None) -> None:
    """Writes ``cast_to_fp8_reference(x_hp, scale, fmt)`` into ``out`` in one kernel.

    x_hp:     a tensor ``triton_cast_supported`` accepts, shape (M, N) or (L,).
    scale:    0-d fp32 tensor on x's device (read there: no host sync).
    fmt:      E4M3 / E5M2, their torch float8 dtype or config name (``as_fp8_format``).
    out:      contiguous ``fmt.dtype`` tensor of x's shape.
    out_t:    optional contiguous ``fmt.dtype`` tensor of shape (N, M) (2-D x only): ``out.t()``'s values.
    amax_out: optional 0-d fp32 tensor on x's device, overwritten with ``tensor_to_amax(x_hp)``
              (NaN anywhere gives NaN, inf gives inf, empty gives 0).
    """
    fmt = as_fp8_format(fmt)
    if not triton_cast_supported(x_hp):
        raise ValueError(f"x_hp must be a contiguous 1-D or 2-D float32/bfloat16/float16 tensor on a CUDA device "
                         f"with compute capability >= 8.9 (or on cpu with TRITON_INTERPRET=1), with triton "
                         f"installed; got {_describe(x_hp)}")
    _check("scale", scale, torch.float32, (), x_hp.device)
    _check("out", out, fmt.dtype, tuple(x_hp.shape), x_hp.device)
    if out_t is not None:
        if x_hp.dim() != 2:
            raise ValueError(f"out_t needs a 2-D x_hp (its transpose); got x_hp of shape {tuple(x_hp.shape)}")
        _check("out_t", out_t, fmt.dtype, tuple(x_hp.shape[::-1]), x_hp.device)
    amax_bits = None
    if amax_out is not None:
        _check("amax_out", amax_out, torch.float32, (), x_hp.device)
        amax_bits = amax_out.zero_().view(torch.int32)  # +0.0: the atomic max's start (and an empty x's amax)
    if x_hp.numel() == 0:
        return
    kernel = importlib.import_module("fp8train._cast_triton_kernel")
    kernel.launch_cast(x_hp.detach(), scale, fmt, out.view(torch.uint8),
                       None if out_t is None else out_t.view(torch.uint8), amax_bits)
