"""Power-of-two scaling: known answers, margin, amax edge cases, and the three recipes' state."""

from __future__ import annotations

import math

import pytest
import torch

from fp8train import E4M3, E5M2, Fp8Config, ScalingState, amax_to_log2_scale, amax_to_scale, quantize, tensor_to_amax
from fp8train.scaling import LOG2_SCALE_MAX, LOG2_SCALE_MIN

KNOWN = [  # (format, amax, expected scale) -- worked out by hand in the comments
    (E4M3, 10.0, 32.0),        # 10 * 32 = 320 <= 448 < 640
    (E4M3, 1e4, 1 / 32),       # 1e4 / 32 = 312.5 <= 448 < 625
    (E4M3, 448.0, 1.0),        # exactly fmax: no headroom needed, none wasted
    (E4M3, 448.0001, 0.5),
    (E4M3, 224.0, 2.0),        # fmax / amax is exactly 2
    (E4M3, 1.0, 256.0),        # 256 <= 448 < 512
    (E5M2, 1.0, 32768.0),      # 57344 = 1.75 * 2**15
    (E5M2, 57344.0 / 8, 8.0),  # exact power-of-two ratio
    (E5M2, 1e-3, 2.0**25),     # 1e-3 * 2**25 = 33554 <= 57344 < 67109
]


@pytest.mark.parametrize(("fmt", "amax", "expected"), KNOWN)
def test_known_answers(fmt, amax: float, expected: float) -> None:
    scale = amax_to_scale(torch.tensor(amax), fmt)
    assert scale.item() == expected
    assert amax * scale.item() <= fmt.max < amax * scale.item() * 2


@pytest.mark.parametrize("margin", [0, 1, 3])
def test_margin_divides_the_scale_by_two_per_unit(margin: int) -> None:
    assert amax_to_scale(torch.tensor(10.0), E4M3, margin=margin).item() == 32.0 / 2**margin


def test_scale_is_exactly_a_power_of_two_over_a_wide_amax_sweep() -> None:
    amax = torch.exp2(torch.linspace(-100, 100, 20001))
    log2_scale = amax_to_log2_scale(amax, E4M3)
    assert torch.equal(log2_scale, log2_scale.round())
    assert (amax * torch.exp2(log2_scale) <= E4M3.max).all()
    assert (amax * torch.exp2(log2_scale + 1) > E4M3.max).all()


AMAX_EDGES = [("zero", 0.0), ("inf", math.inf), ("nan", math.nan)]


@pytest.mark.parametrize(("case", "amax"), AMAX_EDGES)
def test_unusable_amax_keeps_the_previous_scale(case: str, amax: float) -> None:
    prev = torch.tensor(8.0)
    assert amax_to_scale(torch.tensor(amax), E4M3, prev_scale=prev).item() == 8.0, case
    assert amax_to_scale(torch.tensor(amax), E4M3).item() == 1.0, case  # no previous: scale 1


def test_tiny_and_huge_amax_clamp_to_finite_scales() -> None:
    log2 = amax_to_log2_scale(torch.tensor([1e-45, 3e38]), E4M3)
    # 448 / 1e-45 would need 2**157: clamped; 448 / 3e38 needs 2**-120, within [MIN, MAX]
    assert log2.tolist() == [LOG2_SCALE_MAX, -120.0]
    assert LOG2_SCALE_MIN <= -120
    assert torch.isfinite(torch.exp2(-log2)).all()


def test_vector_of_amaxes_is_one_call() -> None:
    amax = torch.tensor([10.0, 0.0, 1e4])
    prev = torch.tensor([1.0, 3.0, 1.0])
    assert amax_to_log2_scale(amax, E4M3, prev_log2_scale=prev).tolist() == [5.0, 3.0, -5.0]


def test_tensor_to_amax() -> None:
    assert tensor_to_amax(torch.tensor([-3.0, 2.0])).item() == 3.0
    assert tensor_to_amax(torch.tensor([1.0, math.nan])).isnan()
    assert tensor_to_amax(torch.tensor([1.0, -math.inf])).item() == math.inf
    assert tensor_to_amax(torch.empty(0)).item() == 0.0


def test_quantize_round_trip_within_half_an_ulp() -> None:
    x = torch.randn(4096)
    x_fp8 = quantize(x, E4M3)
    assert x_fp8.scale_inv.item() == 1 / amax_to_scale(tensor_to_amax(x), E4M3).item()
    rel_err = ((x_fp8.dequantize() - x).abs() / x.abs().clamp_min(E4M3.min_normal * x_fp8.scale_inv)).max()
    assert rel_err <= 2.0**-4  # half an ulp of a 3-bit mantissa, relative, above the normal floor
    assert x_fp8.log2_scale.item() == -math.log2(x_fp8.scale_inv.item())


def _state(recipe: str, **kw) -> ScalingState:
    return ScalingState(E4M3, Fp8Config(recipe=recipe, **kw))


def test_current_recipe_follows_each_tensor() -> None:
    state = _state("current")
    for amax, expected_log2 in [(10.0, 5.0), (1e4, -5.0), (0.0, -5.0), (math.nan, -5.0), (1.0, 8.0)]:
        x = torch.tensor([amax, -0.5 * amax if math.isfinite(amax) else 0.0])
        out = state.quantize(x)
        assert state.log2_scale.item() == expected_log2
        # the cast's own scale_inv is NaN for a non-finite amax, so the GEMMs using it see the overflow
        assert out.log2_scale.item() == expected_log2 if math.isfinite(amax) else math.isnan(out.scale_inv.item())
    assert (state.n_casts.item(), state.n_amax_zero.item(), state.n_amax_nonfinite.item()) == (5, 1, 1)


def test_delayed_recipe_max_over_the_last_L_with_warm_up() -> None:
    state = _state("delayed", amax_history_len=3, amax_compute_algo="max")
    used = []
    for amax in [10.0, 1.0, 1.0, 1.0, 1.0]:
        used.append(state.quantize(torch.tensor([amax])).log2_scale.item())
    # 1st cast: no history -> its own amax (warm-up); then the max of the last <= 3 amaxes
    assert used == [5.0, 5.0, 5.0, 5.0, 8.0]
    assert state.amax_history.tolist() == [1.0, 1.0, 1.0]


def test_delayed_recipe_most_recent() -> None:
    state = _state("delayed", amax_history_len=4, amax_compute_algo="most_recent")
    used = [state.quantize(torch.tensor([a])).log2_scale.item() for a in [10.0, 1.0, 100.0, 1.0]]
    assert used == [5.0, 5.0, 8.0, 2.0]


def test_delayed_recipe_ignores_a_nonfinite_amax_in_its_history() -> None:
    state = _state("delayed", amax_history_len=2)
    state.quantize(torch.tensor([10.0]))
    state.quantize(torch.tensor([math.inf]))
    assert state.n_amax_nonfinite.item() == 1
    assert state.amax_history.tolist() == [0.0, 10.0]
    assert state.log2_scale.item() == 5.0


def test_constant_recipe_uses_the_fixed_bias_whatever_the_amax() -> None:
    state = _state("constant", constant_bias=3)
    out = state.quantize(torch.tensor([1000.0, 1.0]))
    assert out.log2_scale.item() == 3.0
    assert out.dequantize().tolist() == [448.0 / 8, 1.0]  # saturated at fmax / scale
    # the amax is computed only to see inf/nan; it is recorded (monitoring) but never moves the scale
    assert (state.n_casts.item(), state.amax_history.tolist(), state.log2_scale.item()) == (1, [1000.0], 3.0)


def test_scaling_state_round_trips_through_state_dict() -> None:
    a = _state("delayed", amax_history_len=4)
    for v in [3.0, 7.0, 0.5]:
        a.quantize(torch.tensor([v]))
    b = _state("delayed", amax_history_len=4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(64)
    assert torch.equal(a.quantize(x).data.view(torch.uint8), b.quantize(x).data.view(torch.uint8))
    for name, buf in a.named_buffers():
        assert torch.equal(buf, getattr(b, name)), name


def test_delayed_recipe_knows_it_has_a_history_from_its_first_cast_or_a_loaded_state() -> None:
    state = _state("delayed", amax_history_len=3)
    assert not state.has_history
    override = state.quantize(torch.tensor([10.0]), has_history=False)  # an override leaves the flag alone
    assert not state.has_history and override.log2_scale.item() == 5.0  # the first cast: its own amax
    state.quantize(torch.tensor([1.0]))
    assert state.has_history
    fresh = _state("delayed", amax_history_len=3)
    fresh.load_state_dict(state.state_dict())
    assert fresh.has_history
    assert not _state("delayed").has_history and not _state("current").has_history


def test_the_one_pass_delayed_cast_equals_the_two_pass_one_once_there_is_history() -> None:
    """With a history, ``where(n_casts > 0, stored, own amax)`` and the stored scale alone agree:
    the one-pass form only drops work the second pass did for nothing."""
    a, b = _state("delayed", amax_history_len=4), _state("delayed", amax_history_len=4)
    for step, amax in enumerate([3.0, 70.0, 0.01, 5.0]):
        x = torch.randn(256) * amax
        qa, qb = a.quantize(x), b.quantize(x, has_history=False if step == 0 else True)
        assert torch.equal(qa.data.view(torch.uint8), qb.data.view(torch.uint8)) and torch.equal(qa.scale_inv, qb.scale_inv)
    for name, buf in a.named_buffers():
        assert torch.equal(buf, getattr(b, name)), name


def test_compiled_one_pass_delayed_cast_reads_its_input_once() -> None:
    """The generated code (inductor's C++ backend here) has a single loop over the input for amax
    and cast together, once the cast no longer waits for its own amax; the current recipe needs two."""
    import re

    from torch._inductor.utils import run_and_get_code

    x = torch.randn(4096, 256)
    loop = re.compile(rf"x0<static_cast<int64_t>\({x.numel()}L\)")
    loops = {}
    for recipe in ("delayed", "current"):
        state = _state(recipe)
        state.quantize(x)  # the first cast: a history from now on

        def cast(t: torch.Tensor, state: ScalingState = state) -> tuple[torch.Tensor, torch.Tensor]:
            q = state.quantize(t)
            return q.data, q.scale_inv

        torch._dynamo.reset()
        _, code = run_and_get_code(torch.compile(cast, fullgraph=True), x)
        loops[recipe] = len(loop.findall(code[0]))
    assert loops == {"delayed": 1, "current": 2}
