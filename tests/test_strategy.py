"""Trainer strategies on 2 gloo ranks: an inf/NaN gradient on ONE rank makes every rank skip the
step with weights and optimizer state untouched; a finite step leaves the ranks bit-identical."""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_workers
from trainer_utils import tiny_strategy


def _micro_step(model, strategy, rank: int, poison: bool) -> None:
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(256, (4, 16), generator=gen)
    with strategy.accumulating(sync=True):
        _, loss = strategy.module(x, x)
        (loss * (float("nan") if poison else 1.0)).backward()


def _worker(rank: int, world: int, preset: dict) -> dict:
    model, strategy = tiny_strategy(rank, world, preset)
    snapshot = lambda: [p.detach().clone() for p in model.parameters()]  # noqa: E731
    _micro_step(model, strategy, rank, poison=False)
    first = strategy.step()
    strategy.zero_grad()
    after_first = snapshot()
    _micro_step(model, strategy, rank, poison=rank == 1)  # NaN gradients on rank 1 only
    poisoned = strategy.step()
    strategy.zero_grad()
    after_poison = snapshot()
    return {"first": first, "poisoned": poisoned, "unchanged": all(torch.equal(a, b) for a, b in
                                                                    zip(after_first, after_poison)),
            "weights": after_poison}


PRESETS = {
    "ddp_native_fp32": {"gemm": "fp32", "grad_comm": "native", "optimizer": "adamw"},
    "ddp_fp8_comm_fp8_adamw": {"gemm": "fp8", "grad_comm": "fp8", "optimizer": "fp8_adamw"},
    "zero2_fp8_weights": {"gemm": "fp8", "grad_comm": "fp8", "optimizer": "fp8_adamw", "fp8_weights": True},
}


@pytest.mark.parametrize("preset", PRESETS.values(), ids=PRESETS.keys())
def test_overflow_on_one_rank_skips_the_step_everywhere(preset):
    out = run_workers(_worker, 2, preset, timeout_s=120)
    for r in out:
        assert not r["first"].skipped and r["first"].grad_norm is not None
        assert r["poisoned"].skipped, r["poisoned"]
        assert r["unchanged"]  # weights bit-identical to before the poisoned step
    for a, b in zip(out[0]["weights"], out[1]["weights"]):
        assert torch.equal(a, b)  # every rank holds the same weights
    assert out[0]["first"].comm_bytes > 0
