"""ZeRO and DDP agree on a non-finite clipping norm: gradients that are finite
(so they pass the FP8 all-reduce without overflow) but whose squares overflow fp32 give a global norm
of inf; both strategies skip that step on every rank, with weights and optimizer state untouched.

Tolerance tier 1, bit-exact: a skipped step must not move a single bit of weights or state."""

from __future__ import annotations

import math

import pytest
import torch

from dist_utils import run_workers
from trainer_utils import tiny_strategy

# 1e30 * a gradient of order 1e-3..1 is finite in fp32 (max 3.4e38), so the FP8 comm's amax is finite
# and it scales by ~2**-91, but its square (>= 1e54) overflows fp32: the sum of squares is inf
HUGE_LOSS_FACTOR = 1e30
PRESET = {"gemm": "fp32", "grad_comm": "fp8", "optimizer": "fp8_adamw"}


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


def _worker(rank: int, world: int, strategy_name: str) -> dict:
    model, strategy = tiny_strategy(rank, world, PRESET, optim={"max_grad_norm": 1.0}, parallel={"strategy": strategy_name})
    first = _step(model, strategy, rank, 1.0)  # creates the optimizer state
    before = _snapshot(model, strategy)
    huge = _step(model, strategy, rank, HUGE_LOSS_FACTOR)
    after = _snapshot(model, strategy)
    comm = getattr(strategy, "last_comm", None)
    return {"first": first, "huge": huge, "unchanged": len(before) == len(after) and
            all(torch.equal(a, b) for a, b in zip(before, after)),
            "comm_found_inf": None if comm is None else comm.found_inf}


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2"])
def test_a_nonfinite_clip_norm_skips_the_step_on_every_rank(strategy):
    out = run_workers(_worker, 2, strategy, timeout_s=120)
    for r in out:
        assert not r["first"].skipped and math.isfinite(r["first"].grad_norm)
        assert r["huge"].skipped, r["huge"]  # the DDP verdict, and now ZeRO's
        assert r["huge"].grad_norm == math.inf
        assert r["unchanged"], "weights or optimizer state moved on a skipped step"
        assert r["comm_found_inf"] is False, "the gradients must pass the FP8 comm as finite"
