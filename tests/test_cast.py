"""FP8 formats and the cast: bit-exact against ml_dtypes (an independent implementation) and
between our eager reference and the compiled CPU fast path (tier 1: the cast is a deterministic
function, so any difference is a bug)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from fp8train import E4M3, E5M2, Fp8Format, cast_to_fp8, quantization_stats
from fp8train._cast_cpu import _log2_scale_range, fast_cast_supports
from fp8train.cast import FAST_CAST_MIN_NUMEL, cast_to_fp8_reference

FORMATS = [E4M3, E5M2]
ML_DTYPE = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
ONE = torch.tensor(1.0)


def _codes(x_fp8: torch.Tensor) -> torch.Tensor:
    return x_fp8.view(torch.uint8)


def _ml_codes(x: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    return torch.from_numpy(x.numpy().astype(ML_DTYPE[fmt.name]).view(np.uint8).copy())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_format_constants_match_torch_finfo(fmt: Fp8Format) -> None:
    info = torch.finfo(fmt.dtype)
    assert (fmt.max, fmt.min_normal) == (info.max, info.smallest_normal)
    assert fmt.min_subnormal == fmt.min_normal * 2.0**-fmt.mantissa_bits
    assert fmt.log2_max == pytest.approx(math.log2(info.max))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_all_256_codes_decode_like_ml_dtypes_and_round_trip(fmt: Fp8Format) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    ours = codes.view(fmt.dtype).to(torch.float32)
    ref = torch.from_numpy(codes.numpy().view(ML_DTYPE[fmt.name]).astype(np.float32))
    assert torch.equal(ours.isnan(), ref.isnan())
    finite = ~ref.isnan() & ~ref.isinf()
    assert torch.equal(ours[finite], ref[finite])
    assert torch.equal(ours.signbit(), ref.signbit())  # -0 included
    # every finite code survives decode -> our cast (both paths), bit for bit
    for fast in (False, True):
        values = ours[finite].repeat(FAST_CAST_MIN_NUMEL // int(finite.sum()) + 1)
        recoded = _codes(cast_to_fp8(values, ONE, fmt, fast=fast))
        assert torch.equal(recoded, codes[finite].repeat(recoded.numel() // int(finite.sum())))


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_random_values_in_range_match_ml_dtypes_bit_for_bit(fmt: Fp8Format, fast: bool) -> None:
    n = 1 << 20  # >= 1e6 values, log-uniform magnitudes over the whole range incl. subnormals
    log2_mag = torch.empty(n).uniform_(math.log2(fmt.min_subnormal) - 2, fmt.log2_max)
    x = torch.exp2(log2_mag) * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    x = x.clamp(-fmt.max, fmt.max)
    # ties exactly halfway between two FP8 neighbours exercise round-to-nearest-even
    x[:4096] = torch.arange(4096, dtype=torch.float32) * fmt.min_subnormal / 2
    assert torch.equal(_codes(cast_to_fp8(x, ONE, fmt, fast=fast)), _ml_codes(x, fmt))


def _edge_table(fmt: Fp8Format) -> list[tuple[str, float, float]]:
    """(case, input, documented output) -- documented in fp8train/cast.py."""
    eps = 2.0**-(fmt.mantissa_bits + 1)  # half an ulp at fmax, relative
    return [
        ("max", fmt.max, fmt.max),
        ("max*(1+eps) saturates", fmt.max * (1 + eps), fmt.max),
        ("max*(1-eps/2) rounds to max", fmt.max * (1 - eps / 2), fmt.max),
        ("-max*4 saturates", -fmt.max * 4, -fmt.max),
        ("smallest subnormal", fmt.min_subnormal, fmt.min_subnormal),
        ("half the smallest subnormal ties to even (0)", fmt.min_subnormal / 2, 0.0),
        ("0.75 smallest subnormal rounds up", fmt.min_subnormal * 0.75, fmt.min_subnormal),
        ("smallest normal", fmt.min_normal, fmt.min_normal),
        ("zero", 0.0, 0.0),
        ("negative zero", -0.0, -0.0),
        ("+inf saturates to max", math.inf, fmt.max),
        ("-inf saturates to -max", -math.inf, -fmt.max),
        ("nan stays nan", math.nan, math.nan),
    ]


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_edge_table(fmt: Fp8Format, fast: bool) -> None:
    table = _edge_table(fmt)
    # pad to the fast path's minimum size with zeros; the table sits at the front
    x = torch.zeros(FAST_CAST_MIN_NUMEL)
    x[: len(table)] = torch.tensor([value for _, value, _ in table])
    got = cast_to_fp8(x, ONE, fmt, fast=fast)[: len(table)].to(torch.float32)
    for i, (case, _, expected) in enumerate(table):
        if math.isnan(expected):
            assert got[i].isnan(), case
        else:
            assert got[i].item() == expected, case
            assert bool(got[i].signbit()) == (math.copysign(1.0, expected) < 0), case


def _scaled_inputs(log2_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Magnitudes around the FP8 range *at this scale*, plus fp32 subnormals, zeros and specials;
    large enough for the fast path."""
    x = torch.exp2(torch.empty(3 * FAST_CAST_MIN_NUMEL + 7).uniform_(-30, 20) - log2_scale)
    x = (x * torch.where(torch.rand_like(x) < 0.5, -1.0, 1.0)).to(dtype)
    specials = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-40, -3e38]
    x[::997] = torch.tensor(specials * 1000)[: x[::997].numel()].to(dtype)
    return x


def _assert_same_codes(got: torch.Tensor, expected: torch.Tensor, case: object) -> None:
    nan = expected.to(torch.float32).isnan()
    assert torch.equal(got.to(torch.float32).isnan(), nan), case  # NaN sign is not part of the contract
    assert torch.equal(_codes(got)[~nan], _codes(expected)[~nan]), case


def _fast_path_scales(fmt: Fp8Format) -> list[int]:
    lo, hi = _log2_scale_range(fmt)  # the fast path's accepted scales
    return [lo, -20, -3, 0, 5, 24, hi]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_fast_path_equals_reference_for_scaled_inputs(fmt: Fp8Format, dtype: torch.dtype) -> None:
    # two independent implementations (integer bit arithmetic vs torch's cast), compared only where
    # the fast one is really taken
    for log2_scale in _fast_path_scales(fmt):
        scale = torch.tensor(2.0**log2_scale)
        x = _scaled_inputs(log2_scale, dtype)
        assert fast_cast_supports(x, scale, fmt) == log2_scale and x.numel() >= FAST_CAST_MIN_NUMEL
        fast = cast_to_fp8(x, scale, fmt, fast=True)
        _assert_same_codes(fast, cast_to_fp8_reference(x, scale, fmt), (fmt.name, dtype, log2_scale))


def _ml_dtypes_cast(x: torch.Tensor, scale: float, fmt: Fp8Format) -> torch.Tensor:
    """The cast's documented semantics in numpy + ml_dtypes: fp32 product, clamp, RNE to FP8."""
    with np.errstate(over="ignore"):  # an fp32 product beyond fp32's max is inf, then clamped
        y = x.to(torch.float32).numpy() * np.float32(scale)
    y = np.clip(y, -fmt.max, fmt.max).astype(np.float32)  # +-inf -> +-fmax; NaN and -0 stay
    return torch.from_numpy(y.astype(ML_DTYPE[fmt.name]).view(np.uint8).copy()).view(fmt.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_scaled_inputs_the_fast_path_declines_match_ml_dtypes(fmt: Fp8Format, dtype: torch.dtype) -> None:
    # fp16 inputs, and scales outside the fast path's range or not a power of two (2**0.5), take
    # the eager cast; it is checked against ml_dtypes (an independent FP8 rounding), not itself
    lo, hi = _log2_scale_range(fmt)
    scales = (lo - 1, hi + 1, 0.5) if dtype != torch.float16 else (lo - 1, lo, -3, 0, 24, hi, hi + 1, 0.5)
    for log2_scale in scales:
        scale = torch.tensor(2.0**log2_scale)
        x = _scaled_inputs(log2_scale, dtype)
        assert fast_cast_supports(x, scale, fmt) is None
        got = cast_to_fp8(x, scale, fmt, fast=True)
        _assert_same_codes(got, _ml_dtypes_cast(x, float(scale), fmt), (fmt.name, dtype, log2_scale))


def test_quantization_stats_count_saturation_underflow_and_nonfinite() -> None:
    x = torch.tensor([1.0, 500.0, -1e6, math.inf, math.nan, 1e-4, 0.0, 2.0**-9])
    x_fp8 = cast_to_fp8(x, ONE, E4M3)
    stats = quantization_stats(x, ONE, x_fp8, E4M3)
    assert stats.numel == 8
    assert int(stats.saturated) == 3  # 500, -1e6, inf (nan is not counted)
    assert int(stats.underflowed) == 1  # 1e-4 < 2**-10 flushes to 0; 2**-9 survives
    assert int(stats.nonfinite) == 2


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_cast_into_a_preallocated_buffer(fast: bool) -> None:
    x = torch.randn(FAST_CAST_MIN_NUMEL) * 100
    out = torch.empty(x.shape, dtype=E4M3.dtype)
    result = cast_to_fp8(x, ONE, E4M3, fast=fast, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(_codes(out), _codes(cast_to_fp8_reference(x, ONE, E4M3)))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        cast_to_fp8(x, ONE, E5M2, fast=fast, out=out)


def test_compiled_cast_does_not_recompile_for_new_sizes_or_autograd_inputs() -> None:
    from torch._dynamo.utils import counters

    scale = torch.tensor(4.0)
    cast_to_fp8(torch.randn(FAST_CAST_MIN_NUMEL), scale, E4M3)  # warm: compiled once per format/dtype
    graphs_before = counters["stats"]["unique_graphs"]
    for numel in (FAST_CAST_MIN_NUMEL + 1, 3 * FAST_CAST_MIN_NUMEL + 5, 1 << 20):
        for requires_grad in (False, True):
            x = torch.randn(numel, requires_grad=requires_grad)
            assert torch.equal(_codes(cast_to_fp8(x, scale, E4M3)), _codes(cast_to_fp8_reference(x.detach(), scale, E4M3)))
    assert counters["stats"]["unique_graphs"] == graphs_before


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_fast_path_accepts_power_of_two_scales_in_its_range_only(fmt: Fp8Format) -> None:
    lo, hi = _log2_scale_range(fmt)
    x = torch.zeros(8)
    assert [fast_cast_supports(x, torch.tensor(2.0**k), fmt) for k in (lo, 0, hi)] == [lo, 0, hi]
    for scale in (2.0 ** (lo - 1), 2.0 ** (hi + 1), 3.0, 0.75):
        assert fast_cast_supports(x, torch.tensor(scale), fmt) is None, scale
    assert fast_cast_supports(x.half(), torch.tensor(1.0), fmt) is None  # fp16 takes the reference
    assert fast_cast_supports(x.bfloat16(), torch.tensor(1.0), fmt) == 0


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_inside_torch_compile_the_cast_gives_way_to_inductor_bit_for_bit(fmt: Fp8Format) -> None:
    """Traced by torch.compile, cast_to_fp8 takes the reference semantics (the fast kernel, a
    compiled function of its own with host-side scale checks, cannot be traced) and inductor
    generates the loop: the same codes as eager on inputs around the FP8 range at every scale."""
    compiled = torch.compile(cast_to_fp8, fullgraph=True, dynamic=False)
    for dtype in (torch.float32, torch.bfloat16):
        for log2_scale in _fast_path_scales(fmt):
            scale = torch.tensor(2.0**log2_scale)
            x = _scaled_inputs(log2_scale, dtype)
            _assert_same_codes(compiled(x, scale, fmt), cast_to_fp8_reference(x, scale, fmt), (fmt.name, dtype, log2_scale))
