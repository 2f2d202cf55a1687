"""bf16 around the FP8 GEMMs: under autocast an ``Fp8Linear`` returns the autocast dtype, as
``nn.Linear`` would, while its casts and fp32-accumulating GEMMs run exactly as without autocast; the
trainer runs the FP8 presets under bf16 autocast on CUDA and keeps fp32 around the emulation on CPU.

Tolerance tier 1, bit-exact: autocast must change only the output's rounding (fp32 GEMM result
rounded once to bf16), never what happens inside the layer. CPU autocast (bf16) stands in for CUDA's:
the layer's logic is device-independent, and CPU autocast would otherwise turn the emulated fp32
matmul into a bf16 one.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import pytest
import torch
from trainer_utils import tiny_config

from fp8train import Fp8Config, Fp8Linear
from fp8train.trainer.build import build_model
from fp8train.trainer.precision import apply_precision

AUTOCAST_BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _layers(bias: bool) -> tuple[Fp8Linear, Fp8Linear]:
    """Two identical layers (current recipe: no state carried from one call to the next)."""
    torch.manual_seed(0)
    a = Fp8Linear(64, 32, bias=bias, config=Fp8Config(backend="emulated"))
    b = Fp8Linear(64, 32, bias=bias, config=Fp8Config(backend="emulated"))
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_output_is_the_autocast_dtype_rounded_once_from_the_fp32_gemm(bias: bool) -> None:
    plain, autocast = _layers(bias)
    x = torch.randn(4, 8, 64)
    y_fp32 = plain(x)
    with torch.autocast(**AUTOCAST_BF16):
        y = autocast(x)
    assert y.dtype == torch.bfloat16
    if bias:  # the bias is added in the output dtype, as nn.Linear under autocast adds it
        gemm_only = Fp8Linear(64, 32, bias=False, config=Fp8Config(backend="emulated"))
        gemm_only.weight = plain.weight
        expected = gemm_only(x).to(torch.bfloat16) + plain.bias.to(torch.bfloat16)
    else:
        expected = y_fp32.to(torch.bfloat16)
    assert torch.equal(y, expected)


def test_gradients_are_unchanged_by_autocast_even_when_backward_runs_inside_it() -> None:
    plain, autocast = _layers(bias=True)
    x_plain = torch.randn(4, 8, 64, requires_grad=True)
    x_auto = x_plain.detach().clone().requires_grad_()
    plain(x_plain).float().sum().backward()  # dy = 1: the same in fp32 and in bf16
    with torch.autocast(**AUTOCAST_BF16):  # the trainer calls backward() inside its forward context
        autocast(x_auto).float().sum().backward()
    assert x_auto.grad.dtype == torch.float32 and autocast.weight.grad.dtype == torch.float32
    assert torch.equal(x_auto.grad, x_plain.grad)
    assert torch.equal(autocast.weight.grad, plain.weight.grad)
    assert torch.equal(autocast.bias.grad, plain.bias.grad)


@pytest.mark.parametrize("preset", ["fp8_o1", "fp8_o2", "fp8_o3"])
def test_fp8_presets_run_under_bf16_autocast_on_cuda_and_plain_on_cpu(preset: str, tmp_path) -> None:
    cfg = tiny_config(tmp_path, f"precision={preset}")
    on_cpu = apply_precision(build_model(cfg.model, seed=0, device=torch.device("cpu")), cfg.precision,
                             torch.device("cpu"))
    assert isinstance(on_cpu(), nullcontext)
    on_cuda = apply_precision(build_model(cfg.model, seed=0, device=torch.device("cpu")), cfg.precision,
                              torch.device("cuda", 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling autocast" on CPU hosts
        ctx = on_cuda()
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
