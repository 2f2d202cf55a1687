"""Every public entry point that takes an FP8 format accepts our ``Fp8Format`` constants, torch's
float8 dtypes (as torchao does) and the config names, with bit-identical results (tier 1: the same
format by another name must not change a single bit); anything else is a TypeError naming the
allowed values (config dataclasses: a ValueError naming the field, like every config error)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fp8train import (E4M3, E5M2, Fp8Config, Fp8Format, amax_to_log2_scale, amax_to_scale, as_fp8_format,
                      cast_to_fp8, quantization_stats, quantize)
from fp8train.cast import FAST_CAST_MIN_NUMEL, cast_to_fp8_reference
from fp8train.comm import Fp8CommConfig

SCALE = torch.tensor(8.0)


def _x() -> torch.Tensor:
    # large enough for the compiled fast path; magnitudes that saturate, underflow and round
    gen = torch.Generator().manual_seed(0)
    return torch.randn(FAST_CAST_MIN_NUMEL, generator=gen) * torch.logspace(-6, 4, FAST_CAST_MIN_NUMEL)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


# (public function, call with a format -> tensors to compare bit for bit)
ENTRY_POINTS: list[tuple[str, Callable[[object], tuple[torch.Tensor, ...]]]] = [
    ("quantize", lambda f: (lambda q: (q.data, q.scale_inv))(quantize(_x(), f))),
    ("quantize_with_stats", lambda f: (lambda q: (q.stats.saturated, q.stats.underflowed))(
        quantize(_x(), f, with_stats=True, margin=1))),
    ("cast_to_fp8_fast", lambda f: (cast_to_fp8(_x(), SCALE, f),)),
    ("cast_to_fp8_eager", lambda f: (cast_to_fp8(_x(), SCALE, f, fast=False),)),
    ("cast_to_fp8_reference", lambda f: (cast_to_fp8_reference(_x(), SCALE, f),)),
    ("quantization_stats", lambda f: (lambda s: (s.saturated, s.underflowed, s.nonfinite))(
        quantization_stats(_x(), SCALE, cast_to_fp8_reference(_x(), SCALE, as_fp8_format(f)), f))),
    ("amax_to_scale", lambda f: (amax_to_scale(torch.tensor([10.0, 1e4, 0.0]), f, margin=1),)),
    ("amax_to_log2_scale", lambda f: (amax_to_log2_scale(torch.tensor([10.0, 3e-5]), f),)),
]
# (format, its other names)
SPELLINGS = [(E4M3, (torch.float8_e4m3fn, "e4m3")), (E5M2, (torch.float8_e5m2, "e5m2"))]
CASES = [pytest.param(call, fmt, other, id=f"{name}-{fmt.name}-{other}")
         for name, call in ENTRY_POINTS for fmt, others in SPELLINGS for other in others]


@pytest.mark.parametrize("call, fmt, other", CASES)
def test_dtype_or_name_gives_the_same_bits_as_the_format(call, fmt: Fp8Format, other: object) -> None:
    expected, got = call(fmt), call(other)
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert e.dtype == g.dtype and torch.equal(_bits(e), _bits(g))


BAD = [
    ("fp16_dtype", torch.float16),
    ("fnuz_dtype", torch.float8_e4m3fnuz),
    ("e5m2fnuz_dtype", torch.float8_e5m2fnuz),
    ("e8m0_dtype", torch.float8_e8m0fnu),
    ("unknown_name", "fp8"),
    ("int", 3),
    ("none", None),
]
BAD_CALLS = [
    ("as_fp8_format", lambda f: as_fp8_format(f)),
    ("quantize", lambda f: quantize(torch.ones(4), f)),
    ("cast_to_fp8", lambda f: cast_to_fp8(torch.ones(4), SCALE, f)),
    ("cast_to_fp8_reference", lambda f: cast_to_fp8_reference(torch.ones(4), SCALE, f)),
    ("quantization_stats", lambda f: quantization_stats(torch.ones(4), SCALE, torch.ones(4).to(E4M3.dtype), f)),
    ("amax_to_scale", lambda f: amax_to_scale(torch.tensor(1.0), f)),
    ("amax_to_log2_scale", lambda f: amax_to_log2_scale(torch.tensor(1.0), f)),
]


@pytest.mark.parametrize("call", [c for _, c in BAD_CALLS], ids=[n for n, _ in BAD_CALLS])
@pytest.mark.parametrize("bad", [b for _, b in BAD], ids=[n for n, _ in BAD])
def test_anything_else_is_a_type_error_naming_the_allowed_values(call, bad: object) -> None:
    with pytest.raises(TypeError) as err:
        call(bad)
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    for allowed in ("torch.float8_e4m3fn", "torch.float8_e5m2", "E4M3", "E5M2", "'e4m3'", "'e5m2'"):
        assert allowed in message, message


def test_custom_format_records_pass_through() -> None:
    # fp8train.optim scales fp16 state with an Fp8Format record describing fp16's range
    fp16_range = Fp8Format(name="fp16", dtype=torch.float16, max=65504.0, min_normal=2.0**-14,
                           min_subnormal=2.0**-24, mantissa_bits=10, exponent_bias=15)
    assert as_fp8_format(fp16_range) is fp16_range
    assert float(amax_to_scale(torch.tensor(1.0), fp16_range)) == 2.0**15  # 65504 / 2**15 >= 1


# config dataclasses: the dtype is stored as its config name (what YAML / wandb see)
CONFIGS = [
    ("Fp8Config.grad_output_format", lambda v: Fp8Config(grad_output_format=v).grad_output_format, E5M2),
    ("Fp8CommConfig.format", lambda v: Fp8CommConfig(format=v).format, E4M3),
    ("Fp8CommConfig.format_e5m2", lambda v: Fp8CommConfig(format=v).format, E5M2),
]


@pytest.mark.parametrize("build, fmt", [(b, f) for _, b, f in CONFIGS], ids=[n for n, _, _ in CONFIGS])
def test_config_fields_accept_the_dtype_and_keep_the_name(build, fmt: Fp8Format) -> None:
    assert build(fmt.dtype) == build(fmt.name) == fmt.name


@pytest.mark.parametrize("build", [b for _, b, _ in CONFIGS[:2]], ids=[n for n, _, _ in CONFIGS[:2]])
@pytest.mark.parametrize("bad", [torch.float16, torch.float8_e4m3fnuz, "fp8"], ids=["fp16", "fnuz", "fp8"])
def test_config_fields_reject_other_formats_naming_the_field(build, bad: object) -> None:
    with pytest.raises(ValueError, match=r"(grad_output_format|format)=.*allowed values: 'e4m3', 'e5m2'"):
        build(bad)

