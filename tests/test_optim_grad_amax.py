"""``Fp8AdamW.step(grad_amax=...)``: the caller's upper bound of max |grad| per parameter (e.g. the amax its
FP8 gradient all-reduce already agreed on) replaces the optimizer's own read of every gradient.

Tolerance tiers (conftest): bit-exact where the given bound IS the exact max |g| (the bounds, hence the
scales and every stored bit, are the same as without it) and for "nothing written"; an SQNR floor where
the bound is looser (scales may be one binade coarser: an FP8 path, so the floor of e4m3's 3 bits).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fp8train.optim import Fp8AdamW
from fp8train.optim._bucket import Bucket
from fp8train.optim._kernel import load_kernel

PATHS = [pytest.param(False, id="foreach"),
         pytest.param(True, id="fused", marks=pytest.mark.skipif(load_kernel() is None, reason="no C compiler"))]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))


def _exact_amax(model: nn.Module) -> dict[torch.Tensor, torch.Tensor]:
    return {p: p.grad.abs().max().to(torch.float32) for p in model.parameters()}


def _train(model: nn.Module, opt: Fp8AdamW, steps: int, amax_of=None) -> None:
    """``amax_of(model)``: the grad_amax mapping to pass (None: let the optimizer read the gradients)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 16, generator=gen)).pow(2).mean().backward()
        opt.step(grad_amax=None if amax_of is None else amax_of(model))


def _snapshot(model: nn.Module, opt: Fp8AdamW) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for state in opt.state.values():
        out += [v.detach().clone() for v in state.values() if torch.is_tensor(v)]
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_exact_caller_amax_gives_the_same_bits_and_skips_the_gradient_read(monkeypatch, fused, rounding) -> None:
    ref_model, model = _model(), _model()
    ref = Fp8AdamW(ref_model.parameters(), fused=fused, rounding=rounding)
    opt = Fp8AdamW(model.parameters(), fused=fused, rounding=rounding)
    _train(ref_model, ref, 4)
    reads = [0]
    original = Bucket._call_kernel

    def counted(self, name, **arrays):
        reads[0] += name == "fp8adamw_grad_amax"
        return original(self, name, **arrays)

    monkeypatch.setattr(Bucket, "_call_kernel", counted)
    monkeypatch.setattr(torch, "_foreach_norm", lambda *a, **k: pytest.fail("gradients read for their amax"))
    _train(model, opt, 4, _exact_amax)
    assert reads[0] == 0
    for a, b in zip(_snapshot(ref_model, ref), _snapshot(model, opt), strict=True):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("factor", [2.0, 1000.0])
def test_a_looser_caller_amax_is_still_correct(fused, factor) -> None:
    # a looser bound can only coarsen scales; the states then keep e4m3's precision, no overflow
    ref_model, model = _model(), _model()
    ref = Fp8AdamW(ref_model.parameters(), fused=fused)
    opt = Fp8AdamW(model.parameters(), fused=fused)
    _train(ref_model, ref, 5)
    _train(model, opt, 5, lambda m: {p: a * factor for p, a in _exact_amax(m).items()})
    assert opt.skipped_steps == 0
    for slot, scales in opt.log2_scales().items():
        assert bool((scales <= ref.log2_scales()[slot]).all()), slot
    for p_ref, p in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.isfinite(p).all()
        err = (p - p_ref).pow(2).sum()
        sqnr_db = 10 * torch.log10(p_ref.pow(2).sum() / err) if err > 0 else torch.tensor(float("inf"))
        assert sqnr_db > 40.0  # the weights move by ~lr per step; states differ by e4m3 roundings only


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_caller_amax_skips_with_nothing_written(fused, bad) -> None:
    model = _model()
    opt = Fp8AdamW(model.parameters(), fused=fused)
    _train(model, opt, 2)
    before = _snapshot(model, opt)
    first = next(model.parameters())
    _train(model, opt, 1, lambda m: {**_exact_amax(m), first: torch.tensor(bad)})
    assert opt.last_step_skipped and opt.skipped_steps == 1
    for a, b in zip(before, _snapshot(model, opt), strict=True):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("fused", PATHS)
def test_a_partial_mapping_reads_the_gradients_of_that_bucket(fused) -> None:
    ref_model, model = _model(), _model()
    ref = Fp8AdamW(ref_model.parameters(), fused=fused)
    opt = Fp8AdamW(model.parameters(), fused=fused)
    _train(ref_model, ref, 3)
    # a huge bound for one parameter only: ignored (the bucket has no bound for the others)
    _train(model, opt, 3, lambda m: {next(m.parameters()): torch.tensor(1e30)})
    for a, b in zip(_snapshot(ref_model, ref), _snapshot(model, opt), strict=True):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("fused", PATHS)
def test_caller_amax_may_be_python_floats_or_other_dtypes(fused) -> None:
    ref_model, model = _model(), _model()
    ref = Fp8AdamW(ref_model.parameters(), fused=fused)
    opt = Fp8AdamW(model.parameters(), fused=fused)
    _train(ref_model, ref, 3)
    # alternate a float and a float64 0-d tensor: both converted to the same fp32 value
    _train(model, opt, 3, lambda m: {p: float(a) if i % 2 else a.double()
                                     for i, (p, a) in enumerate(_exact_amax(m).items())})
    for a, b in zip(_snapshot(ref_model, ref), _snapshot(model, opt), strict=True):
        assert torch.equal(_bits(a), _bits(b))
