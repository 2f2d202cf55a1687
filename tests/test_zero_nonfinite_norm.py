"""ZeRO and DDP agree on a clipping norm of gradients that are finite (so they pass the FP8 all-reduce
without overflow) but whose squares overflow fp32:
  - torch's AdamW: the fp32 sums of squares give a global norm of inf; both strategies skip that step on
    every rank, with weights and optimizer state untouched (bit-exact: not a single bit moves);
  - Fp8AdamW: its clip squares and sums in float64 (``Fp8AdamW.clip_grad_norm_``), where no fp32
    gradient can overflow, so the norm is finite and the step is clipped, not lost, on every rank."""

from __future__ import annotations

import math

import pytest
import torch

from dist_utils import run_workers
from trainer_utils import tiny_strategy

# 1e30 * a gradient of order 1e-3..1 is finite in fp32 (max 3.4e38), so the FP8 comm's amax is finite
# and it scales by ~2**-91, but its square (>= 1e54) overflows fp32: the sum of squares is inf
HUGE_LOSS_FACTOR = 1e30
PRESET = {"gemm": "fp32", "grad_comm": "fp8"}


def _step(model, strategy, rank: int, loss_factor: float):
    x = torch.randint(256, (4, 16), generator=torch.Generator().manual_seed(100 + rank))
    with strategy.accumulating(sync=True):
        _, loss = strategy.module(x, x)
        (loss * loss_factor).backward()
    outcome = strategy.step()
    strategy.zero_grad()
    return outcome


def _bytes(obj) -> list[torch.Tensor]:
    """Every tensor in a nested state dict, as raw bytes (any dtype, FP8 included)."""
    if torch.is_tensor(obj):
        return [obj.detach().reshape(-1).clone().view(torch.uint8)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _bytes(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _bytes(v)]
    return []


def _snapshot(model, strategy) -> list[torch.Tensor]:
    zero = getattr(strategy, "zero", None)
    state = zero.state_dict()["param_state"] if zero is not None else strategy.optimizer.state_dict()["state"]
    return _bytes(list(model.parameters())) + _bytes(state)


def _worker(rank: int, world: int, strategy_name: str, optimizer: str) -> dict:
    model, strategy = tiny_strategy(rank, world, {**PRESET, "optimizer": optimizer}, optim={"max_grad_norm": 1.0},
                                    parallel={"strategy": strategy_name})
    first = _step(model, strategy, rank, 1.0)  # creates the optimizer state
    before = _snapshot(model, strategy)
    huge = _step(model, strategy, rank, HUGE_LOSS_FACTOR)
    after = _snapshot(model, strategy)
    comm = getattr(strategy, "last_comm", None)
    return {"first": first, "huge": huge, "unchanged": len(before) == len(after) and
            all(torch.equal(a, b) for a, b in zip(before, after)),
            "comm_found_inf": None if comm is None else comm.found_inf,
            "params_finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
            "params": [p.detach().clone() for p in model.parameters()]}


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2"])
def test_an_fp32_overflowing_clip_norm_skips_the_step_on_every_rank(strategy):
    out = run_workers(_worker, 2, strategy, "adamw", timeout_s=120)
    for r in out:
        assert not r["first"].skipped and math.isfinite(r["first"].grad_norm)
        assert r["huge"].skipped, r["huge"]  # the DDP verdict, and ZeRO's
        assert r["huge"].grad_norm == math.inf
        assert r["unchanged"], "weights or optimizer state moved on a skipped step"
        assert r["comm_found_inf"] is False, "the gradients must pass the FP8 comm as finite"


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2"])
def test_fp8_adamw_clips_such_gradients_instead_of_skipping(strategy):
    out = run_workers(_worker, 2, strategy, "fp8_adamw", timeout_s=120)
    for r in out:
        assert not r["first"].skipped and math.isfinite(r["first"].grad_norm)
        assert not r["huge"].skipped, r["huge"]
        assert 1e29 < r["huge"].grad_norm < 1e32, r["huge"]  # ~1e30 x the first step's norm, finite
        assert not r["unchanged"] and r["params_finite"], "a clipped step moves the weights, finitely"
        assert r["comm_found_inf"] is False
    for a, b in zip(out[0]["params"], out[1]["params"]):
        assert torch.equal(a, b), "the ranks took the same step"
