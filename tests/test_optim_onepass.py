"""Fp8AdamW's one-pass step: scales from upper bounds of the new amaxes (optim/_bounds.py), so a step
reads each state once; two passes only where a bound is unusable (no record yet, e.g. a state saved
before records existed; a bound that is not finite).

Tolerance tiers (conftest): bit-exact for "nothing written" / round trips / fused vs foreach; the bound
test is an inequality that must hold exactly (a bound below the amax would overflow an fp16 state
to inf or saturate e4m3): no tolerance.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from fp8train.optim import Fp8AdamW
from fp8train.optim._bucket import RECORD_KEY, Bucket
from fp8train.optim._kernel import load_kernel

PATHS = [pytest.param(False, id="foreach"),
         pytest.param(True, id="fused", marks=pytest.mark.skipif(load_kernel() is None, reason="no C compiler"))]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _count_pass1(monkeypatch) -> list[int]:
    calls = [0]
    original = Bucket.pass1

    def counted(self):
        calls[0] += 1
        return original(self)

    monkeypatch.setattr(Bucket, "pass1", counted)
    return calls


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))


def _train(model: nn.Module, opt: Fp8AdamW, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 16, generator=gen)).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_every_step_is_one_pass_from_the_first(monkeypatch, fused, rounding) -> None:
    # The issue: each step read every tensor twice (pass 1: amax, pass 2: recompute and store).
    # A fresh state has a record (m = v = 0, the master's amax), so no step needs pass 1.
    calls = _count_pass1(monkeypatch)
    model = _model()
    opt = Fp8AdamW(model.parameters(), lr=1e-2, fused=fused, rounding=rounding)
    _train(model, opt, 4)
    assert calls[0] == 0
    assert all(int(s["step"]) == 4 and s[RECORD_KEY].shape == (7,) for s in opt.state.values())


@pytest.mark.parametrize("fused", PATHS)
def test_a_state_saved_without_records_loads_takes_two_passes_once_then_one(monkeypatch, fused) -> None:
    # Checkpoints written before records existed: the first step after loading derives the scales
    # from the exact amax (pass 1) and records; every later step is one pass. The record is saved
    # and restored with the state, so a resumed run continues bit-exactly (tier 1).
    model = _model()
    opt = Fp8AdamW(model.parameters(), lr=1e-2, fused=fused)
    _train(model, opt, 2)
    legacy = copy.deepcopy(opt.state_dict())
    for state in legacy["state"].values():
        del state[RECORD_KEY]
    model2 = copy.deepcopy(model)
    opt2 = Fp8AdamW(model2.parameters(), lr=1e-2, fused=fused)
    opt2.load_state_dict(legacy)
    calls = _count_pass1(monkeypatch)
    _train(model2, opt2, 1, seed=1)
    assert calls[0] == 1 and all(RECORD_KEY in s for s in opt2.state.values())
    _train(model2, opt2, 2, seed=2)
    assert calls[0] == 1
    buffer = io.BytesIO()
    torch.save(opt2.state_dict(), buffer)
    buffer.seek(0)
    model3 = copy.deepcopy(model2)
    opt3 = Fp8AdamW(model3.parameters(), lr=1e-2, fused=fused)
    opt3.load_state_dict(torch.load(buffer))
    _train(model2, opt2, 2, seed=3)
    _train(model3, opt3, 2, seed=3)
    assert calls[0] == 1
    for a, b in zip(list(model2.parameters()) + [v for s in opt2.state.values() for v in s.values()],
                    list(model3.parameters()) + [v for s in opt3.state.values() for v in s.values()]):
        assert torch.equal(_bits(a), _bits(b))


def test_a_malformed_record_is_refused() -> None:
    model = _model()
    opt = Fp8AdamW(model.parameters())
    _train(model, opt, 1)
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0][RECORD_KEY] = torch.zeros(3)
    with pytest.raises(ValueError, match=RECORD_KEY):
        Fp8AdamW(model.parameters()).load_state_dict(bad)


def _gradients(case: str, step: int, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Adversarial gradient sequences for the bounds: jumps of 8 decades up and down, sign flips
    against m, single spikes, zero rows (m and v decay into e4m3 / fp16 subnormals and flush while
    others stay large), and tiny fp32 values."""
    g = torch.randn(shape, generator=gen)
    if case == "jumps":
        return g * (1e4 if step % 3 == 1 else 1e-4)
    if case == "sign_flips":
        return torch.full(shape, 1e-2 * (-1) ** step) + g * 1e-5
    if case == "spike":
        out = g * 1e-6
        out.view(-1)[step % out.numel()] = 50.0
        return out
    if case == "flush":  # half the elements stop receiving gradient after step 2
        out = g * 1e-1
        if step > 2:
            out.view(-1)[: out.numel() // 2] = 0.0
        return out
    return g * 1e-36  # "tiny": fp32 subnormal products


CASES = ["jumps", "sign_flips", "spike", "flush", "tiny"]
FORMATS = [("e4m3", "fp16", "fp16"), ("fp16", "bf16", "fp16"), ("e4m3", "fp16", "bf16"), ("bf16", "fp32", None)]


@pytest.mark.parametrize("fmt", FORMATS, ids=["-".join(str(x) for x in f) for f in FORMATS])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("case", CASES)
def test_the_bounds_are_upper_bounds_of_the_new_amaxes(case, rounding, fmt) -> None:
    # At every step, before the step: the bounds the one-pass step scales with, and the exact new
    # amaxes (pass 1, which writes nothing). Every bound must be finite and >= the amax (an fp16
    # state stored with a scale from a smaller bound would overflow to inf). Large lr and weight
    # decay make the weight move by whole units per step.
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(300) * s) for s in (0.02, 3.0)] + [nn.Parameter(torch.randn(7, 5))]
    opt = Fp8AdamW(params, lr=0.3, weight_decay=0.5, betas=(0.5, 0.9), rounding=rounding, seed=3,
                   exp_avg_dtype=fmt[0], exp_avg_sq_dtype=fmt[1], master_dtype=fmt[2], fused=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(12):
        for p in params:
            p.grad = _gradients(case, step, p.shape, gen)
        for bucket in opt._buckets(opt.param_groups[0]):
            bound = bucket.bounds(bucket.grad_amax())
            amax = bucket.pass1()
            assert bound is not None and bool(torch.isfinite(bound).all()), (step, bound)
            cols = [0, 1, 2] if fmt[2] == "fp16" else [0, 1]  # only a scaled master needs the weight's
            assert bool((amax[:, cols] <= bound[:, cols]).all()), (step, amax, bound)
        opt.step()
        assert not opt.last_step_skipped
        for s in opt.state.values():
            for key in ("exp_avg_scaled", "exp_avg_sq_scaled", "master_scaled"):
                if key in s:
                    assert bool(torch.isfinite(s[key].float()).all()), (step, key)


@pytest.mark.parametrize("fused", PATHS)
def test_an_unusable_bound_falls_back_to_two_passes_with_the_same_bits_on_both_paths(monkeypatch, fused) -> None:
    # eps = 1e-30 makes the weight bound unusable (the denominator's subnormal roundings are not
    # small beside eps): every step takes pass 1, is not skipped, and matches the other path (tier 1).
    def run(fused_path: bool) -> list[torch.Tensor]:
        model = _model()
        opt = Fp8AdamW(model.parameters(), lr=1e-2, eps=1e-30, fused=fused_path)
        _train(model, opt, 3)
        assert opt.skipped_steps == 0
        return list(model.parameters()) + [v for s in opt.state.values() for v in s.values()]

    calls = _count_pass1(monkeypatch)
    ours = run(fused)
    assert calls[0] == 3
    for a, b in zip(ours, run(not fused) if load_kernel() is not None else ours):
        assert torch.equal(_bits(a), _bits(b))
