"""An inf in any of an ``Fp8Linear``'s three casts must not vanish.

The casts clamp +-inf to +-fmax (their contract, fp8train/cast.py); what keeps the overflow visible
is that the ``Fp8Tensor`` a ``ScalingState`` returns for a non-finite amax carries a NaN
``scale_inv``, so every GEMM using that operand yields NaN. Every ordinary check downstream then
sees it: ``fp8_all_reduce_``'s ``found_inf``, ``clip_grad_norm_(error_if_nonfinite=True)`` and
``torch.amp.GradScaler``. No tolerances here: the assertions are about finiteness only.
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import run_workers

from fp8train import Fp8Config, Fp8Linear
from fp8train.comm import Fp8CommConfig, fp8_all_reduce_

RECIPES = ["current", "delayed", "constant"]

# (where the inf goes, the GEMM outputs that use that cast: all NaN; the other one stays finite)
#   y = x @ w^T,  dx = dy @ w,  dw = dy^T @ x
POISONED = [
    pytest.param("input", {"y", "dw"}, id="input"),
    pytest.param("weight", {"y", "dx"}, id="weight"),
    pytest.param("grad_output", {"dx", "dw"}, id="grad_output"),
]
ROLE_STATE = {"input": "input_scaling", "weight": "weight_scaling", "grad_output": "grad_output_scaling"}


def _layer(recipe: str, backend: str = "emulated") -> Fp8Linear:
    # bias-free, as every Llama projection: no bias gradient (a plain sum of dy) to carry the inf
    return Fp8Linear(64, 96, bias=False, config=Fp8Config(recipe=recipe, backend=backend, constant_bias=4))


def _with_inf(t: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of ``t`` with one element (not the first: nothing special about position 0) set to value."""
    t = t.clone()
    t.view(-1)[7] = value
    return t


def _forward_backward(layer: Fp8Linear, where: str, value: float) -> dict[str, torch.Tensor]:
    x, dy = torch.randn(4, 8, 64), torch.randn(4, 8, 96)
    if where == "input":
        x = _with_inf(x, value)
    if where == "weight":
        with torch.no_grad():
            layer.weight.view(-1)[7] = value
    if where == "grad_output":
        dy = _with_inf(dy, value)
    x.requires_grad_()
    y = layer(x)
    y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad}


@pytest.mark.parametrize("value", [math.inf, -math.inf], ids=["inf", "-inf"])
@pytest.mark.parametrize("backend", ["emulated", "scaled_mm"])
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize(("where", "poisoned"), POISONED)
def test_inf_in_a_cast_makes_the_gemms_that_use_it_nan(where, poisoned, recipe, backend, value):
    layer = _layer(recipe, backend)
    _forward_backward(layer, "none", 0.0)  # a clean step first: delayed scaling then runs on its history
    layer.zero_grad()
    state = getattr(layer, ROLE_STATE[where])
    before = state.n_amax_nonfinite.item()
    out = _forward_backward(layer, where, value)
    for name, t in out.items():
        if name in poisoned:
            assert torch.isnan(t).all(), f"{name} should be NaN, max |{name}| = {t.abs().max().item()}"
        else:
            assert torch.isfinite(t).all(), name
    assert state.n_amax_nonfinite.item() == before + 1  # the counter is kept
    assert torch.isfinite(state.log2_scale) and torch.isfinite(state.amax_history).all()  # and the scale too


def _grads_with_inf_in_grad_output(layer: Fp8Linear, inject: bool) -> torch.Tensor:
    """The loss of a tiny model whose Fp8Linear output gradient receives an inf (via a tensor hook,
    as the trainer's ``faults.nonfinite_where=activation_grad`` does) when ``inject``."""
    x = torch.randn(4, 8, 64)
    y = layer(x)
    if inject:
        y.register_hook(lambda g: _with_inf(g, math.inf))
    return (y.float() ** 2).mean()


@pytest.mark.parametrize("recipe", RECIPES)
def test_clip_grad_norm_sees_an_inf_in_an_output_gradient(recipe):
    layer = _layer(recipe)
    _grads_with_inf_in_grad_output(layer, inject=True).backward()
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(layer.parameters(), max_norm=1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("recipe", RECIPES)
def test_grad_scaler_skips_the_step(recipe):
    layer = _layer(recipe)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    weight_before = layer.weight.detach().clone()
    scaler.scale(_grads_with_inf_in_grad_output(layer, inject=True)).backward()
    scaler.step(opt)
    scaler.update()
    # bit-exact: a skipped step must not touch the weight; the scaler backs off (x 0.5)
    assert torch.equal(layer.weight.detach().view(torch.uint8), weight_before.view(torch.uint8))
    assert scaler.get_scale() == 2.0**9


def _worker_found_inf(rank: int, world_size: int) -> list[bool]:
    """Per recipe: found_inf of the all-reduce when only the last rank's output gradient had an inf."""
    found = []
    for recipe in RECIPES:
        torch.manual_seed(0)  # the same layer on every rank
        layer = _layer(recipe)
        _grads_with_inf_in_grad_output(layer, inject=rank == world_size - 1).backward()
        found.append(fp8_all_reduce_([layer.weight.grad], config=Fp8CommConfig()).found_inf)
    return found


def test_all_reduce_reports_an_inf_from_one_ranks_output_gradient_on_every_rank():
    assert run_workers(_worker_found_inf, 2, timeout_s=90) == [[True] * len(RECIPES)] * 2


def _fault_model() -> torch.nn.Module:
    # a plain nn.Linear first: the fault must pick the first *FP8* linear layer
    return torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), _layer("current"), torch.nn.Linear(96, 8))


@pytest.mark.parametrize(("value", "rank", "step", "last_micro", "fires"), [
    pytest.param("inf", 1, 3, True, True, id="inf-fires"),
    pytest.param("nan", 1, 3, True, True, id="nan-fires"),
    pytest.param("inf", 0, 3, True, False, id="other-rank"),
    pytest.param("inf", 1, 2, True, False, id="other-step"),
    pytest.param("inf", 1, 3, False, False, id="not-last-micro-step"),
])
def test_activation_grad_fault_poisons_the_first_fp8_linear_output_gradient(value, rank, step, last_micro, fires):
    from fp8train.trainer.faults import Faults, FaultsConfig

    model = _fault_model()
    faults = Faults(FaultsConfig(nonfinite_step=3, nonfinite_rank=1, nonfinite_value=value,
                                 nonfinite_where="activation_grad"), rank, resumed=False, model=model)
    loss = torch.tensor(1.0)
    assert faults.on_loss(step, 1, loss, last=True) is loss  # the loss is left alone in this mode
    with faults.micro_step_context(step, 1 if last_micro else 0, last=last_micro):
        model(torch.randn(4, 64)).square().mean().backward()
    first, fp8, last = model
    # the FP8 layer's grad_output cast saw the inf/nan: its dw and everything upstream are NaN
    assert torch.isnan(fp8.weight.grad).all() == fires and torch.isnan(first.weight.grad).all() == fires
    assert torch.isfinite(last.weight.grad).all()  # downstream of the injection: untouched
    model.zero_grad()
    model(torch.randn(4, 64)).square().mean().backward()  # the hook is gone once the context closes
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_faults_config_rejects_an_unknown_place():
    from fp8train.trainer.faults import FaultsConfig

    with pytest.raises(ValueError, match=r"FaultsConfig.nonfinite_where='forward' is not allowed; allowed values: "
                                         r"'loss', 'activation_grad'"):
        FaultsConfig(nonfinite_where="forward")
