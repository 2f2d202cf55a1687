"""Fp8AdamW's stochastic rounding (``rounding="stochastic"``): the same bits on every path, the same
bits for the same seed and a resumed run, an unbiased rounding rule, and the issue's acceptance test
(steady gradients move the weights like torch.optim.AdamW, where round-to-nearest falls 20-30 % short).

Tolerance tiers (conftest): bit-exact for path / seed / resume identity; statistical bounds (a few
standard errors of a mean, derived next to each test) for unbiasedness and the steady-gradient run.
"""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from test_optim_numerics import _bits, _run
from torch import nn

from fp8train.optim import Fp8AdamW, Fp8AdamWConfig
from fp8train.optim._kernel import load_kernel
from fp8train.optim._rounding import SR_SPECS, element_bits, stochastic_grid

needs_kernel = pytest.mark.skipif(load_kernel() is None, reason="no C compiler: the fused kernel cannot be built")
SR = dict(rounding="stochastic", seed=7)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


# ---- the same bits on every path ---------------------------------------------------------------

@needs_kernel
@pytest.mark.parametrize(
    "exp_avg_dtype,exp_avg_sq_dtype,master_dtype",
    list(itertools.product(["e4m3", "bf16", "fp16", "fp32"], ["fp16", "bf16", "fp32"], ["fp16", "bf16", "fp32", None])),
)
def test_fused_kernel_is_bit_identical_to_the_foreach_path_with_stochastic_rounding(
        exp_avg_dtype, exp_avg_sq_dtype, master_dtype) -> None:
    eager = _run(False, exp_avg_dtype, exp_avg_sq_dtype, master_dtype, **SR)
    fused = _run(True, exp_avg_dtype, exp_avg_sq_dtype, master_dtype, **SR)
    assert _same(eager, fused)
    if master_dtype != "fp32" or exp_avg_dtype != "fp32":  # something rounds: it must differ from nearest
        assert not _same(fused, _run(True, exp_avg_dtype, exp_avg_sq_dtype, master_dtype))


@needs_kernel
@pytest.mark.parametrize("exp_avg_dtype,exp_avg_sq_dtype,master_dtype",
                         [("e4m3", "fp16", "fp16"), ("e4m3", "bf16", None), ("fp16", "fp32", "bf16")])
def test_portable_kernel_build_is_bit_identical_with_stochastic_rounding(monkeypatch, exp_avg_dtype,
                                                                         exp_avg_sq_dtype, master_dtype) -> None:
    monkeypatch.setattr("fp8train.optim._bucket.load_kernel", lambda: load_kernel(portable=True))
    assert _same(_run(False, exp_avg_dtype, exp_avg_sq_dtype, master_dtype, **SR),
                 _run(True, exp_avg_dtype, exp_avg_sq_dtype, master_dtype, **SR))


@pytest.mark.parametrize("exp_avg_dtype,exp_avg_sq_dtype,master_dtype",
                         [("e4m3", "fp16", "fp16"), ("e4m3", "bf16", None), ("bf16", "fp32", "fp32")])
def test_the_compiled_foreach_path_is_bit_identical_with_stochastic_rounding(exp_avg_dtype, exp_avg_sq_dtype,
                                                                             master_dtype) -> None:
    torch._dynamo.reset()
    assert _same(_run(False, exp_avg_dtype, exp_avg_sq_dtype, master_dtype, **SR),
                 _run(False, exp_avg_dtype, exp_avg_sq_dtype, master_dtype, compiled=True, **SR))


# ---- seeds and resume --------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_same_seed_same_bits_other_seed_other_bits(fused) -> None:
    if fused and load_kernel() is None:
        pytest.skip("no C compiler")
    seven = _run(fused, "e4m3", "fp16", "fp16", rounding="stochastic", seed=7)
    assert _same(seven, _run(fused, "e4m3", "fp16", "fp16", rounding="stochastic", seed=7))
    assert not _same(seven, _run(fused, "e4m3", "fp16", "fp16", rounding="stochastic", seed=8))


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_save_and_load_mid_run_continues_bit_exactly(fused) -> None:
    # Tier 1: 3 steps, save, load into a fresh model + optimizer built with ANOTHER seed (the saved
    # per-parameter keys win), 3 more steps on both: identical bits everywhere.
    if fused and load_kernel() is None:
        pytest.skip("no C compiler")
    data = [torch.randn(8, 16) for _ in range(6)]

    def make(seed: int) -> tuple[nn.Module, Fp8AdamW]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
        return model, Fp8AdamW(model.parameters(), lr=1e-2, rounding="stochastic", seed=seed, fused=fused)

    def train(model: nn.Module, opt: Fp8AdamW, batches: list[torch.Tensor]) -> None:
        for x in batches:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    def snapshot(model: nn.Module, opt: Fp8AdamW) -> list[torch.Tensor]:
        return [p.detach().clone() for p in model.parameters()] + [
            v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]

    model, opt = make(seed=1)
    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    model2, opt2 = make(seed=2)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    train(model, opt, data[3:])
    train(model2, opt2, data[3:])
    assert _same(snapshot(model2, opt2), snapshot(model, opt))


def test_rounding_settings_are_validated() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="Fp8AdamW.rounding='up' is not allowed; allowed values: 'nearest', 'stochastic'"):
        Fp8AdamW(params, rounding="up")
    with pytest.raises(ValueError, match=r"Fp8AdamW.seed=-1 is out of range; allowed: integers in \[0, 2\*\*32\)"):
        Fp8AdamW(params, seed=-1)
    with pytest.raises(ValueError, match="Fp8AdamWConfig.rounding"):
        Fp8AdamWConfig(rounding="stochastik")
    opt = Fp8AdamWConfig(rounding="stochastic", seed=3).build(params)
    assert opt._stochastic and opt._seed == 3


# ---- the rule is unbiased ----------------------------------------------------------------------

SR_CASES = {  # format: (random bits, values in the scaled domain: normal, subnormal, near the max)
    "e4m3": (32, [1.0 + 1 / 40, -3.3, 0.7, 417.0, 447.0, 2.0**-6 * 0.37, -(2.0**-9) * 0.3, 2.0**-12, 2.0**-6 * 0.999]),
    "fp16": (16, [1.0 + 1 / 3000, -3.3e-3, 700.1, 65500.0, 2.0**-14 * 0.37, -(2.0**-24) * 0.3, 2.0**-20 / 3]),
    "bf16": (16, [1.0 + 1 / 500, -3.3e-30, 1e38 / 3, 2.0**-130 / 3]),
}


@pytest.mark.parametrize("name", list(SR_CASES))
def test_stochastic_rounding_is_unbiased_and_lands_on_the_neighbours(name) -> None:
    # Each value is rounded N = 2**16 times (bits from the optimizer's own generator, one stream).
    # Every result must be one of the two grid neighbours (lo <= x <= hi, from torch's own casts),
    # and the mean must equal x within 6 standard errors: the spread of one rounding is at most
    # (hi - lo) / 2, so the standard error of the mean is <= (hi - lo) / (2 sqrt(N)) = (hi - lo) / 512.
    # Round-to-nearest misses by up to (hi - lo) / 2 on the same values: 40x the tolerance.
    random_bits, values = SR_CASES[name]
    dtype = {"e4m3": torch.float8_e4m3fn, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    n = 2**16
    bits = element_bits(torch.tensor(12345, dtype=torch.int64), n)
    bits = bits if random_bits == 32 else bits & 0xFFFF
    for x in values:
        y = stochastic_grid(torch.full((n,), x, dtype=torch.float32), bits, SR_SPECS[name], random_bits)
        assert torch.equal(y.to(dtype).float(), y), (name, x)  # on the grid: the encoder keeps it
        lo, hi = y.min().item(), y.max().item()
        assert lo <= x <= hi and len(set(y.tolist())) <= 2, (name, x, lo, hi)
        tolerance = 6 * max(hi - lo, abs(x) * 2.0**-20) / (2 * math.sqrt(n))
        assert abs(y.double().mean().item() - x) <= tolerance, (name, x)


# ---- acceptance: steady gradients --------------------------------------------------------------

def _steady_displacement_ratio(rounding: str, steps: int = 3000) -> torch.Tensor:
    """Per element dw(Fp8AdamW) / dw(torch AdamW) after ``steps`` steps of one constant gradient per
    element (512 elements, |g| log-uniform over 1e-4 .. 1e-1, random signs), default formats (e4m3
    m, fp16 v, fp16 master), the fused kernel where it can be built."""
    gen = torch.Generator().manual_seed(5)
    n = 512
    grad = torch.exp(torch.empty(n).uniform_(math.log(1e-4), math.log(1e-1), generator=gen))
    grad *= torch.randint(0, 2, (n,), generator=gen) * 2.0 - 1.0
    w0 = torch.randn(n, generator=gen) * 0.02
    ours, ref = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    # lr 1e-4 over 3000 steps moves each weight ~0.3: updates stay well above the fp16 master's
    # grid noise (SR adds a random walk of ~sqrt(3000) * ulp / 2 ~ 1 % of the displacement)
    opt = Fp8AdamW([ours], lr=1e-4, weight_decay=0.0, rounding=rounding, seed=0)
    adamw = torch.optim.AdamW([ref], lr=1e-4, weight_decay=0.0)
    for _ in range(steps):
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        adamw.step()
    return (ours.detach() - w0) / (ref.detach() - w0)


def test_steady_gradients_move_the_weights_like_adamw_with_stochastic_rounding() -> None:
    # The acceptance criterion: median |dw_ours / dw_adamw - 1| <= 3 %. Unbiased rounding
    # leaves only noise: m (e4m3, ~6 % per rounding) averaged by the EMA and the 3000 steps, and
    # the master's random walk above (~1 %); a 3 % median leaves room for neither a bias nor a
    # dropped update.
    ratio = _steady_displacement_ratio("stochastic")
    assert float((ratio - 1).abs().median()) <= 0.03


def test_steady_gradients_show_the_bias_of_round_to_nearest() -> None:
    # The same run with rounding="nearest": EMA increments under half an ulp are dropped, so m_hat
    # and v_hat settle short of g and g**2 (the issue measured m_hat / g ~ 0.71, v_hat / g**2 ~ 0.78):
    # the weights move 20-30 % less than AdamW's. Asserted: the median miss exceeds the 3 % above.
    ratio = _steady_displacement_ratio("nearest")
    assert float((ratio - 1).abs().median()) > 0.03
