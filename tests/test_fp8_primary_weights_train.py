"""The trainer with FP8 primary weights (``precision=fp8_o3``: ZeRO-2, each Fp8Linear storing E4M3
codes, the master only in Fp8AdamW), in-process on one rank.

Tolerance tier: bit-exact. FP8 primary weights compute what high-precision weights do (see
tests/test_fp8_primary_weights_zero.py), so fp8_o3 must log the very metrics of fp8_o2 under ZeRO-2,
and a run stopped and resumed those of a straight run (both roundings: fp8_o3's default is stochastic)."""

from __future__ import annotations

import pytest
import torch

from fp8train.trainer.run import train
from trainer_utils import metrics_without_timing, tiny_config

COMMON = ("model=llama_tiny", "train.steps=8", "logging.log_every=1", "monitor.every=4", "monitor.plots=false",
          "checkpoint.every=4", "train.eval_every=4", "train.grad_accum_steps=2")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _losses(run_dir) -> list[tuple[int, float | None, float | None]]:
    return [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in metrics_without_timing(run_dir)]


def test_fp8_o3_trains_bit_identically_to_high_precision_weights_under_zero2(tmp_path, cache_dir):
    data = f"data.cache_dir={cache_dir}"
    train(tiny_config(tmp_path / "o3", *COMMON, data, "precision=fp8_o3", "precision.optim_state.rounding=nearest"))
    train(tiny_config(tmp_path / "o2", *COMMON, data, "precision=fp8_o2", "parallel.strategy=zero2"))
    o3, o2 = _losses(tmp_path / "o3"), _losses(tmp_path / "o2")
    assert len(o3) >= 8 and o3 == o2
    weights = torch.load(next((tmp_path / "o3" / "checkpoints").glob("step_00000008")) / "model.pt")
    codes = [k for k in weights if k.endswith("weight_codes")]
    assert codes and all(weights[k].dtype == torch.float8_e4m3fn for k in codes)
    assert not any(k.removesuffix("_codes") in weights for k in codes)  # the codes are the weight


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_a_stopped_fp8_o3_run_resumes_to_the_straight_runs_metrics(tmp_path, cache_dir, rounding):
    args = (*COMMON, f"data.cache_dir={cache_dir}", "precision=fp8_o3", f"precision.optim_state.rounding={rounding}")
    train(tiny_config(tmp_path / "straight", *args))
    train(tiny_config(tmp_path / "resumed", *args, "train.stop_after=4"))
    train(tiny_config(tmp_path / "resumed", *args))
    assert metrics_without_timing(tmp_path / "resumed") == metrics_without_timing(tmp_path / "straight")
