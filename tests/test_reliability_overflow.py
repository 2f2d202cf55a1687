"""An inf inside the backward (not in the loss) is skipped by every rank, end to end through the CLI:
``faults.nonfinite_where=activation_grad`` puts inf into the gradient flowing into
the first FP8 linear layer's output (llama_tiny: layers.0.attn.wq, bias-free) on rank 1. The FP8
casts clamp inf, so only the NaN scale_inv of that grad_output cast (fp8train/scaling_state.py) carries the
overflow into the gradients; every rank must then skip the step with its weights bit-identical.
Two 2-process torchrun runs of ~8 steps each (~1 min on 2 cores): ``make test-reliability``."""

from __future__ import annotations

import math

import pytest
import torch
from test_reliability_recovery import _changed_keys, _ckpt, _skip_counter, _state_files, _train

from fp8train.trainer.run_log import read_metrics

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("preset", ["fp8_o2", "fp8_o3"])  # DDP + Fp8AdamW; ZeRO-2 + FP8 weights
def test_inf_in_an_activation_gradient_is_skipped_by_every_rank(tmp_path, cache_dir, preset):
    k, steps = 4, 6  # saved every step, so steps k-2 .. k+1 can be compared
    run_dir = tmp_path / "run"
    _train(run_dir, cache_dir, "model=llama_tiny", f"precision={preset}", f"train.steps={steps}",
           "train.eval_every=0", "checkpoint.every=1", f"checkpoint.keep_last={steps}",
           f"faults.nonfinite_step={k}", "faults.nonfinite_rank=1", "faults.nonfinite_where=activation_grad",
           nproc=2)

    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["train/skipped_steps"] for r in rows] == [0] * (k - 1) + [1] * (steps - k + 1)
    # the loss itself was finite: the overflow happened inside the backward
    assert all(math.isfinite(r["train/loss"]) for r in rows)

    # every rank skipped: weights and optimizer state after step k are those after step k-1, bit for
    # bit (rank 0's gradients were finite; under ZeRO each rank's shard is compared)
    assert _changed_keys(_ckpt(run_dir, k - 1), _ckpt(run_dir, k)) == \
        {name: [] for name in _state_files(_ckpt(run_dir, k))}
    assert _changed_keys(_ckpt(run_dir, k - 2), _ckpt(run_dir, k - 1))["model.pt"]  # the check has teeth
    assert _changed_keys(_ckpt(run_dir, k), _ckpt(run_dir, k + 1))["model.pt"]
    assert set(_skip_counter(_ckpt(run_dir, k - 1))) == {0}
    assert set(_skip_counter(_ckpt(run_dir, k))) == {1}

    # on rank 1 exactly one cast saw the inf: the grad_output cast of the hooked layer
    before = torch.load(_ckpt(run_dir, k - 1) / "rank1.pt", weights_only=True)["scaling"]
    after = torch.load(_ckpt(run_dir, k) / "rank1.pt", weights_only=True)["scaling"]
    overflowed = [key[:-len("n_amax_nonfinite")] for key in after
                  if key.endswith("n_amax_nonfinite") and after[key] > before[key]]
    assert len(overflowed) == 1 and overflowed[0].endswith("layers.0.attn.wq.grad_output_scaling."), overflowed
