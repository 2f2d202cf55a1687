"""``parallel=fsdp2`` in the trainer (fp8train/trainer/fsdp_strategy.py), 2 gloo ranks: fp8_o2 on FSDP2 (FP8
reduce-scatter, FP8 weight all-gather, Fp8AdamW on shards) follows ddp's fp8_o2 loss curve within FP8
tolerance from the same seed and data, keeps the ranks' weights identical, and skips a step whose
gradient overflows on one rank on every rank, weights and optimizer state untouched. fp8_o3 on FSDP2 (FP8
primary weights as 1-byte shards) trains bit for bit as fp8_o2 on FSDP2 and skips overflows alike. Through
the CLI (reliability): a killed rank resumes to the same metrics as an uninterrupted run, and a checkpoint
written by 2 ranks resumes on 1 (torch.distributed.checkpoint reshards), with FP8 primary weights too."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import run_workers
from fp8train.trainer.checkpoint import latest_checkpoint
from fp8train.trainer.run_log import read_metrics
from trainer_utils import assert_one_line_error, cli_env, metrics_without_timing, run_cli, tiny_strategy

FP8_O2 = {"gemm": "fp8", "grad_comm": "fp8", "optimizer": "fp8_adamw"}
FP8_O3 = {**FP8_O2, "fp8_weights": True}  # FP8 primary weights (fp8train/comm/fsdp_fp8_weights.py)
STEPS = 20
# FP8 collectives differ between the strategies (FSDP2: FP8 weight gather, no requantized mean), each a
# few % per element; over 20 steps the loss curves stay within 1 % of each other (measured ~0.1-0.3 %)
LOSS_RTOL = 0.01


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()


def _train_worker(rank: int, world: int, parallel: str, poison_step: int | None, precision: dict = FP8_O2,
                  steps: int = STEPS) -> dict:
    model, strategy = tiny_strategy(rank, world, precision, parallel={"strategy": parallel})
    losses, outcomes, around_poison = [], [], {}
    for step in range(steps):
        x = torch.randint(256, (4, 16), generator=torch.Generator().manual_seed(100 * step + rank))
        poison = step == poison_step and rank == 1
        if step == poison_step:
            around_poison["before"] = [_full(p) for p in model.parameters()]
            around_poison["state_before"] = {k: v.clone() for k, v in strategy.local_optimizer.log2_scales().items()}
        with strategy.accumulating(sync=True):
            _, loss = strategy.module(x, x)
            strategy.backward(loss * (float("nan") if poison else 1.0))
        outcomes.append(strategy.step())
        strategy.zero_grad()
        if step == poison_step:
            around_poison["after"] = [_full(p) for p in model.parameters()]
            around_poison["state_after"] = strategy.local_optimizer.log2_scales()
        losses.append(float(loss.detach()))
    return {"losses": losses, "skipped": [o.skipped for o in outcomes], "params": [_full(p) for p in model.parameters()],
            "comm_bytes": [o.comm_bytes for o in outcomes], "storage": _weight_storage(model), **around_poison}


def _weight_storage(model: torch.nn.Module) -> dict[str, tuple[str, int, int]]:
    """{name: (local tensor type, bytes of its codes or values, local elements)} of the Linear weights."""
    from fp8train.weight_tensor import Fp8WeightTensor

    out = {}
    for name, p in model.named_parameters():
        shard = p.to_local() if hasattr(p, "to_local") else p
        if isinstance(shard, Fp8WeightTensor):
            out[name] = ("fp8", shard.codes.numel() * shard.codes.element_size(), shard.numel())
        elif name.endswith("c_fc.weight"):
            out[name] = ("plain", shard.numel() * shard.element_size(), shard.numel())
    return out


@pytest.mark.reliability  # two 20-step runs on 2 ranks (~40 s): kept out of the default suite's time budget
def test_fsdp2_follows_ddp_and_keeps_ranks_identical():
    fsdp = run_workers(_train_worker, 2, "fsdp2", None, timeout_s=240)
    ddp = run_workers(_train_worker, 2, "ddp", None, timeout_s=240)
    for a, b in zip(fsdp[0]["params"], fsdp[1]["params"]):
        assert torch.equal(a, b), "every rank holds the same (gathered) weights"
    for r in range(2):
        assert not any(fsdp[r]["skipped"])
        for step, (f, d) in enumerate(zip(fsdp[r]["losses"], ddp[r]["losses"])):
            assert abs(f - d) <= LOSS_RTOL * d, (step, f, d)
    assert fsdp[0]["losses"][-1] < fsdp[0]["losses"][0] - 0.5, "it trains"


def test_fsdp2_overflow_on_one_rank_skips_everywhere():
    out = run_workers(_train_worker, 2, "fsdp2", 3, timeout_s=240)
    for res in out:
        assert res["skipped"][3] and not any(res["skipped"][:3] + res["skipped"][4:])
        assert all(torch.equal(a, b) for a, b in zip(res["before"], res["after"])), "weights untouched"
        for key, before in res["state_before"].items():
            assert torch.equal(before, res["state_after"][key]), key
    assert all(torch.equal(a, b) for a, b in zip(out[0]["params"], out[1]["params"]))


FP8_WEIGHT_STEPS = 8


def test_fsdp2_fp8_primary_weights_train_as_high_precision_weights_do():
    """fp8_o3 on fsdp2 stores each Fp8Linear shard as 1-byte codes and computes bit for bit what fp8_o2 on
    fsdp2 computes (its weights are cast by the same current-recipe rule from the same master values)."""
    o3 = run_workers(_train_worker, 2, "fsdp2", None, FP8_O3, FP8_WEIGHT_STEPS, timeout_s=240)
    o2 = run_workers(_train_worker, 2, "fsdp2", None, FP8_O2, FP8_WEIGHT_STEPS, timeout_s=240)
    for r in range(2):
        assert o3[r]["losses"] == o2[r]["losses"], r
        assert not any(o3[r]["skipped"])
        fp8 = {n: v for n, v in o3[r]["storage"].items() if v[0] == "fp8"}
        assert len(fp8) == 4, "c_attn, attn c_proj, c_fc, mlp c_proj"
        for name, (_, nbytes, numel) in fp8.items():
            assert nbytes == numel > 0, name  # 1 byte per element of this rank's shard
        assert o2[r]["storage"]["h.0.mlp.c_fc.weight"][0] == "plain"
        # the stored codes travel as the FP8 weight gather of fp8_o2 sends them: the same bytes
        assert o3[r]["comm_bytes"] == o2[r]["comm_bytes"]
    for a, b in zip(o3[0]["params"], o3[1]["params"]):
        assert torch.equal(a, b), "every rank holds the same (gathered) weights"
    assert o3[0]["losses"][-1] < o3[0]["losses"][0] - 0.3, "it trains"


def test_fsdp2_fp8_primary_weights_skip_an_overflow_everywhere():
    out = run_workers(_train_worker, 2, "fsdp2", 2, FP8_O3, 4, timeout_s=240)
    for res in out:
        assert res["skipped"] == [False, False, True, False]
        assert all(torch.equal(a, b) for a, b in zip(res["before"], res["after"])), "weights untouched"
    assert all(torch.equal(a, b) for a, b in zip(out[0]["params"], out[1]["params"]))


def _sampled_weight_counts_worker(rank: int, world: int) -> list[tuple[int, int, int, int, int]]:
    from fp8train.linear import Fp8Linear

    model, strategy = tiny_strategy(rank, world, FP8_O3, parallel={"strategy": "fsdp2"})
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    for layer in layers:
        layer.weight_scaling.sample_stats = True
    x = torch.randint(256, (4, 16), generator=torch.Generator().manual_seed(rank))
    _, loss = strategy.module(x, x)
    strategy.backward(loss)
    strategy.step()
    return [(layer.weight.shape.numel(), int(layer.weight_scaling.stat_numel),
             int(layer.weight_scaling.stat_nonzero), int(layer.weight_scaling.stat_saturated),
             int((layer.weight.full_tensor().to(torch.float32) != 0).sum())) for layer in layers]


def test_fsdp2_fp8_primary_weights_sample_whole_tensor_cast_counts():
    """Sampled cast statistics of the step's weight casts (monitor.every) cover the whole tensor on every
    rank, although each rank cast only its shard: the counts are summed over the mesh."""
    out = run_workers(_sampled_weight_counts_worker, 2, timeout_s=240)
    assert out[0] == out[1]
    for numel, counted, nonzero, saturated, nonzero_codes in out[0]:
        assert counted == numel and saturated == 0
        assert nonzero >= nonzero_codes > 0  # an element may underflow to 0, none comes from 0


# ---- through the CLI (reliability) ------------------------------------------------------------------

COMMON = ("experiment=smoke", "parallel=fsdp2", "logging.progress=false", "logging.log_every=1",
          "monitor.plots=false", "launcher.cpu_threads=1", "checkpoint.every=10")


def _cli(run_dir: Path, cache_dir: Path, *overrides: str, nproc: int):
    result = run_cli([*COMMON, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *overrides],
                     cwd=run_dir.parent, cache_dir=cache_dir, torchrun_nproc=nproc, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.reliability
def test_fsdp2_resumes_after_a_kill_and_at_another_world_size(tmp_path):
    cache = tmp_path / "cache"
    baseline = tmp_path / "baseline" / "run"
    baseline.parent.mkdir()
    _cli(baseline, cache, nproc=2)
    # a rank killed at step 13 (torchrun restarts the group): resumed from step 10 to the same metrics
    killed = tmp_path / "killed" / "run"
    killed.parent.mkdir()
    _killed_run(killed, cache)
    assert latest_checkpoint(killed).name == f"step_{STEPS:08d}"
    assert metrics_without_timing(killed) == metrics_without_timing(baseline)
    # the 2-rank checkpoint of step 10, resumed on 1 rank: DCP reshards model and Fp8AdamW state
    resharded = tmp_path / "resharded" / "run"
    (resharded / "checkpoints").mkdir(parents=True)
    shutil.copytree(baseline / "checkpoints" / "step_00000010", resharded / "checkpoints" / "step_00000010")
    out = _cli(resharded, cache, nproc=1)
    assert "resumed from" in out.stdout + out.stderr
    base = {r["step"]: r for r in read_metrics(baseline) if "train/loss" in r}
    mine = {r["step"]: r for r in read_metrics(resharded) if "train/loss" in r}
    assert min(mine) == 11, "training continued from step 10"
    # the same weights and state, another batch split: close to the 2-rank curve, far below a fresh start
    assert abs(mine[11]["train/loss"] - base[11]["train/loss"]) < 0.05 * base[11]["train/loss"]
    assert mine[11]["train/loss"] < base[1]["train/loss"] - 0.3


def _killed_run(run_dir: Path, cache_dir: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "fp8train", *COMMON, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}",
           "faults.kill_step=13", "faults.kill_rank=1"]
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "resumed from" in proc.stdout + proc.stderr


@pytest.mark.reliability
def test_fsdp2_fp8_primary_weights_resume_at_another_world_size(tmp_path):
    """fp8_o3 on fsdp2 through the CLI: the 2-rank checkpoint of step 10 (the weights as their exact
    dequantized values) resumes on 2 ranks to the very metrics of the uninterrupted run (the codes and
    scales come back exactly), and on 1 rank goes on from the same losses."""
    cache = tmp_path / "cache"
    baseline = tmp_path / "baseline" / "run"
    baseline.parent.mkdir()
    _cli(baseline, cache, "precision=fp8_o3", nproc=2)
    same = tmp_path / "same" / "run"
    (same / "checkpoints").mkdir(parents=True)
    shutil.copytree(baseline / "checkpoints" / "step_00000010", same / "checkpoints" / "step_00000010")
    _cli(same, cache, "precision=fp8_o3", nproc=2)
    after_10 = [r for r in metrics_without_timing(baseline) if r.get("step", 0) > 10]
    assert after_10 and metrics_without_timing(same) == after_10
    resharded = tmp_path / "resharded" / "run"
    (resharded / "checkpoints").mkdir(parents=True)
    shutil.copytree(baseline / "checkpoints" / "step_00000010", resharded / "checkpoints" / "step_00000010")
    _cli(resharded, cache, "precision=fp8_o3", nproc=1)
    base = {r["step"]: r for r in read_metrics(baseline) if "train/loss" in r}
    mine = {r["step"]: r for r in read_metrics(resharded) if "train/loss" in r}
    assert min(mine) == 11, "training continued from step 10"
    assert abs(mine[11]["train/loss"] - base[11]["train/loss"]) < 0.05 * base[11]["train/loss"]
    assert mine[11]["train/loss"] < base[1]["train/loss"] - 0.3


def test_fsdp2_fp8_primary_weights_with_block_scales_is_a_one_line_error(tmp_path):
    cache = tmp_path / "cache"
    proc = run_cli(["experiment=smoke", "parallel=fsdp2", "precision=fp8_o3", "precision.fp8.granularity=block",
                    f"hydra.run.dir={tmp_path / 'run'}", f"data.cache_dir={cache}"], tmp_path, cache)
    assert_one_line_error(proc.returncode, proc.stderr, "allowed: granularity=tensor with recipe=current")
    assert not (tmp_path / "run" / "checkpoints").exists()
