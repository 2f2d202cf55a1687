"""Training with finer scales end to end: the trainer composes precision.fp8.granularity, logs block
biases on monitored steps, and resumes bit for bit (nothing new is checkpointed: recipe "current")."""

from __future__ import annotations

import pytest
from trainer_utils import metrics_without_timing, tiny_config

from fp8train.trainer.checkpoint import latest_checkpoint
from fp8train.trainer.run import train


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.reliability  # three tiny runs, 1-4 min on the shared CPUs: make test-reliability
@pytest.mark.parametrize("granularity", ["mx"])  # the one with E8M0 scales
def test_resume_with_finer_scales_is_bit_exact(tmp_path, cache_dir, granularity):
    common = ("precision=fp8_o2", f"precision.fp8.granularity={granularity}", "logging.log_every=1",
              f"data.cache_dir={cache_dir}", "train.grad_accum_steps=2")
    straight = train(tiny_config(tmp_path / "straight", *common))
    first = train(tiny_config(tmp_path / "resumed", *common, "train.stop_after=10"))
    assert first.step == 10 and latest_checkpoint(tmp_path / "resumed").name == "step_00000010"
    second = train(tiny_config(tmp_path / "resumed", *common))
    a, b = metrics_without_timing(tmp_path / "straight"), metrics_without_timing(tmp_path / "resumed")
    assert second.step == 20 and len(a) == len(b) > 20
    assert a == b  # tier 1: every loss, grad norm, scaling and block bias, exactly
    assert straight.val_loss == second.val_loss
    assert any("/block_bias_median/" in k for row in a for k in row)
