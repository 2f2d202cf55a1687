"""``Fp8AdamW.clip_grad_norm_``: the clip folded into the next step (optim/_clip.py).

What must hold: the norm is torch's quantity, measured more exactly (float64 sums of exact squares in the
kernel); the step that follows is bit-identical to clipping the gradients first with that norm's
coefficient (fp32 multiply) and stepping; the gradients are never written; a gradient changed between
the two calls is refused; a non-finite gradient leaves nothing pending and the step skips."""

from __future__ import annotations

import math

import pytest
import torch

from fp8train.optim import Fp8AdamW
from fp8train.optim._kernel import load_kernel

# sizes that leave every loop of the gradient read some elements: the 4-stream AVX-512 part, the 32- and
# 8-wide AVX2 loops, the scalar tail; one tensor spans two chunks (65,536 elements each)
_SIZES = (4 * 16 * 64 + 37, 70_001, 300, 5)


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in _SIZES]


def _set_grads(params: list[torch.nn.Parameter], step: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        g = torch.randn(p.shape, generator=gen) * scale
        g[step % p.numel()] = -7.0 * scale  # the largest |g| of the tensor, negative
        p.grad = g.to(p.dtype)


def _exact_norm(params: list[torch.nn.Parameter]) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))


@pytest.mark.parametrize("fused", [None, False], ids=["kernel", "foreach"])
@pytest.mark.parametrize("maximize", [False, True])
def test_step_after_clip_is_bit_identical_to_clipping_the_gradients_first(fused, maximize) -> None:
    ours, ref = _params(torch.float32), _params(torch.float32)
    kwargs = dict(fused=fused, rounding="stochastic", maximize=maximize, weight_decay=0.1)
    opt, opt_ref = Fp8AdamW(ours, **kwargs), Fp8AdamW(ref, **kwargs)
    coefs = []
    for step, scale in enumerate((1e-3, 1.0, 30.0, 1e-4, 5.0)):  # norms below and above max_norm
        _set_grads(ours, step, scale)
        _set_grads(ref, step, scale)
        before = [p.grad.clone() for p in ours]
        norm = opt.clip_grad_norm_(2.0)
        assert all(torch.equal(p.grad, b) for p, b in zip(ours, before)), "the clip writes no gradient"
        coef = (2.0 / (norm + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s formula
        coefs.append(float(coef))
        torch._foreach_mul_([p.grad for p in ref], coef)
        opt.step()
        opt_ref.step()
        assert all(torch.equal(a, b) for a, b in zip(ours, ref)), f"step {step}"
        assert all(torch.equal(opt.state[a][k], opt_ref.state[b][k]) for a, b in zip(ours, ref)
                   for k in opt.state[a] if torch.is_tensor(opt.state[a][k]))
    assert min(coefs) < 0.01 and max(coefs) == 1.0, coefs  # both regimes were exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused,rel_tol", [(None, 1e-7), (False, 1e-5)], ids=["kernel", "foreach"])
def test_norm_matches_a_float64_reference(dtype, fused, rel_tol) -> None:
    if fused is None and load_kernel() is None:
        pytest.skip("no C compiler: the kernel cannot be built here")
    params = _params(dtype)
    _set_grads(params, 3, 1e3)
    norm = Fp8AdamW(params, fused=fused).clip_grad_norm_(1.0)
    exact = _exact_norm(params)
    assert norm.dtype == torch.float32 and norm.dim() == 0
    assert abs(float(norm) - exact) <= rel_tol * exact, (float(norm), exact)
    # torch's own (fp32 norms; a bf16 one for bf16 gradients) is the same quantity, less exactly
    torch_norm = float(torch.nn.utils.clip_grad_norm_(params, math.inf))
    assert abs(torch_norm - exact) <= 1e-2 * exact


def test_portable_kernel_gives_the_same_norm_and_amax_to_rounding(monkeypatch) -> None:
    if load_kernel() is None:
        pytest.skip("no C compiler: the kernel cannot be built here")
    params = _params(torch.float32)
    _set_grads(params, 1, 1.0)
    norm = Fp8AdamW(params).clip_grad_norm_(1e9)
    monkeypatch.setattr("fp8train.optim.adamw.load_kernel", lambda: load_kernel(portable=True))
    monkeypatch.setattr("fp8train.optim._bucket.load_kernel", lambda: load_kernel(portable=True))
    opt = Fp8AdamW(params)
    norm_portable = opt.clip_grad_norm_(1e9)
    assert abs(float(norm_portable) - float(norm)) <= 1e-7 * float(norm)
    for p in params:  # the exact max |g| of each, the clip coefficient being 1
        assert float(opt._pending_clip.grad_amax[p]) == float(p.grad.abs().max())


def test_a_gradient_changed_after_the_clip_is_refused() -> None:
    params = _params(torch.float32)
    opt = Fp8AdamW(params)
    _set_grads(params, 0, 1.0)
    opt.clip_grad_norm_(1.0)
    params[1].grad.mul_(3.0)  # e.g. another backward accumulating into it
    with pytest.raises(RuntimeError, match="changed .* after clip_grad_norm_"):
        opt.step()
    _set_grads(params, 0, 1.0)
    opt.clip_grad_norm_(1.0)
    params[2].grad = params[2].grad.clone()  # a new tensor, same values: still not what was measured
    with pytest.raises(RuntimeError, match="after clip_grad_norm_"):
        opt.step()


def test_zero_grad_drops_the_pending_clip() -> None:
    params, ref = _params(torch.float32), _params(torch.float32)
    opt, opt_ref = Fp8AdamW(params), Fp8AdamW(ref)
    _set_grads(params, 0, 100.0)
    opt.clip_grad_norm_(1e-3)  # a coefficient far below 1 that must not reach the next step
    opt.zero_grad()
    _set_grads(params, 1, 1.0)
    _set_grads(ref, 1, 1.0)
    opt.step()
    opt_ref.step()
    assert all(torch.equal(a, b) for a, b in zip(params, ref))


@pytest.mark.parametrize("fused", [None, False], ids=["kernel", "foreach"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_gives_a_non_finite_norm_and_a_skipped_step(fused, bad) -> None:
    params = _params(torch.float32)
    opt = Fp8AdamW(params, fused=fused)
    _set_grads(params, 0, 1.0)
    opt.step()
    before = [p.detach().clone() for p in params]
    _set_grads(params, 1, 1.0)
    params[1].grad[70_000] = bad  # in the second chunk of the tensor
    norm = opt.clip_grad_norm_(1.0)
    assert not math.isfinite(float(norm))
    assert opt._pending_clip is None
    opt.step()
    assert opt.last_step_skipped
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan"), "1", True])
def test_bad_max_norm_is_a_one_line_error(max_norm) -> None:
    with pytest.raises(ValueError, match=r"max_norm=.* allowed: a number > 0"):
        Fp8AdamW(_params(torch.float32)).clip_grad_norm_(max_norm)


def test_reduce_sumsq_receives_the_per_parameter_sums_in_group_order() -> None:
    params = _params(torch.float32)
    _set_grads(params, 2, 1.0)
    params[2].grad = None  # no gradient: its entry stays 0
    seen = []

    def reduce(sumsq: torch.Tensor) -> torch.Tensor:
        seen.append(sumsq.clone())
        return 4.0 * sumsq.sum()  # e.g. four ranks with the same sums

    opt = Fp8AdamW([{"params": params[2:]}, {"params": params[:2]}])
    norm = opt.clip_grad_norm_(1.0, reduce_sumsq=reduce)
    (sumsq,) = seen
    order = params[2:] + params[:2]
    assert sumsq.dtype == torch.float64 and sumsq.shape == (4,) and float(sumsq[0]) == 0.0
    for value, p in zip(sumsq.tolist(), order):
        if p.grad is not None:
            assert value == pytest.approx(float(p.grad.double().square().sum()), rel=1e-12)
    assert float(norm) == pytest.approx(2.0 * math.sqrt(float(sumsq.sum())), rel=1e-7)
