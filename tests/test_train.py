"""End-to-end training runs: every precision preset, bit-exact resume, torchrun with 2 processes,
Hydra sweeps. Runs are tiny (experiment=smoke: 20 steps of 4 x 64 tokens on the bundled corpus)."""

from __future__ import annotations

import json
import math

import pytest

from fp8train.trainer.run import train
from fp8train.trainer.checkpoint import latest_checkpoint
from fp8train.trainer.run_log import read_metrics
from trainer_utils import metrics_without_timing, run_cli, tiny_config
from wandb_offline import history_rows

PRESETS = ("fp32", "bf16", "fp8_o1", "fp8_o2", "fp8_o3")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _losses(run_dir):
    return [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]


@pytest.mark.parametrize("preset", PRESETS)
def test_each_precision_preset_trains_and_checkpoints(tmp_path, cache_dir, preset):
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, f"precision={preset}", "logging=wandb_offline", "logging.progress=false",
                      f"data.cache_dir={cache_dir}")
    result = train(cfg)
    assert result.step == 20 and result.skipped_steps == 0
    losses = _losses(run_dir)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.3, losses  # it learns (byte unigram entropy is ~4.5 nats from ~5.5)
    assert math.isfinite(result.val_loss)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000010", "step_00000020"]
    assert json.loads((run_dir / "checkpoints/step_00000020/trainer.json").read_text())["step"] == 20
    assert (run_dir / "config.yaml").is_file()
    rows = history_rows(run_dir)
    logged = {k for row in rows for k in row}
    assert "train/loss" in logged and "val/loss" in logged
    bias_keys = {k for k in logged if "/scaling_bias/" in k}
    if preset.startswith("fp8"):
        # every cast role of every converted layer: 2 blocks x (qkv, attn_out, ffn_in, ffn_out)
        casts = {k for k in bias_keys if k.split("/")[2] in ("input", "weight", "grad_output")}
        assert len(casts) == 2 * 4 * 3, sorted(casts)
        roles = {k.split("/")[2] for k in bias_keys}
        assert roles == ({"input", "weight", "grad_output", "wgrad"} |
                         ({"m", "v", "master"} if preset != "fp8_o1" else set()))
        values = [row[k] for row in rows for k in bias_keys if k in row]
        assert all(float(v).is_integer() for v in values)  # power-of-two scales: integer biases
    else:
        assert not bias_keys


@pytest.mark.parametrize("preset", ["fp8_o2", "fp8_o3"])
def test_resume_gives_the_same_losses_bit_for_bit(tmp_path, cache_dir, preset):
    common = (f"precision={preset}", "logging.log_every=1", f"data.cache_dir={cache_dir}", "train.grad_accum_steps=2")
    straight = train(tiny_config(tmp_path / "straight", *common))
    first = train(tiny_config(tmp_path / "resumed", *common, "train.stop_after=10"))
    assert first.step == 10 and latest_checkpoint(tmp_path / "resumed").name == "step_00000010"
    second = train(tiny_config(tmp_path / "resumed", *common))
    assert second.step == 20
    a, b = metrics_without_timing(tmp_path / "straight"), metrics_without_timing(tmp_path / "resumed")
    assert len(a) == len(b) > 20
    assert a == b  # every loss, lr, grad norm, scaling bias and val loss, exactly
    assert straight.val_loss == second.val_loss


def test_finished_run_is_not_trained_again(tmp_path, cache_dir):
    cfg = tiny_config(tmp_path / "run", "train.steps=4", "checkpoint.every=0", f"data.cache_dir={cache_dir}",
                      "precision=fp32")
    assert train(cfg).step == 4
    before = read_metrics(tmp_path / "run")
    assert train(cfg).step == 4
    assert read_metrics(tmp_path / "run") == before


@pytest.mark.parametrize("preset", ["fp8_o2", "fp8_o3"])
def test_torchrun_two_processes(tmp_path, cache_dir, preset):
    run_dir = tmp_path / "run"
    proc = run_cli(["experiment=smoke", f"precision={preset}", "logging=wandb_offline", "logging.progress=false",
                    f"hydra.run.dir={run_dir}"], tmp_path, cache_dir, torchrun_nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 x cpu" in proc.stdout
    final = run_dir / "checkpoints/step_00000020"
    files = sorted(p.name for p in final.iterdir())
    assert {"rank0.pt", "rank1.pt", "trainer.json", "model.pt"} <= set(files)
    if preset == "fp8_o3":  # ZeRO: per-rank optimizer shards by parameter name, and a manifest
        assert {"optim-rank0-of-2.pt", "optim-rank1-of-2.pt", "manifest.json"} <= set(files)
    rows = history_rows(run_dir)
    assert any("/scaling_bias/" in k for row in rows for k in row)
    comm = [r["train/comm_bytes"] for r in read_metrics(run_dir) if "train/comm_bytes" in r]
    assert comm and all(c > 0 for c in comm)
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1  # only rank 0 reports


@pytest.mark.parametrize("nproc", [None, 2], ids=["1_process", "torchrun_2_processes"])
def test_hydra_sweep_runs_every_combination(tmp_path, cache_dir, nproc):
    # under torchrun every rank runs the sweep; the process group must carry over between its runs
    sweep_dir = tmp_path / "multirun"
    proc = run_cli(["-m", "precision=fp32,fp8_o2", "experiment=smoke", "train.steps=3", "checkpoint.every=0",
                    "logging.progress=false", "monitor.plots=false", f"hydra.sweep.dir={sweep_dir}"], tmp_path,
                   cache_dir, torchrun_nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert len(runs) == 2 and "precision=fp32" in runs[0] and "precision=fp8_o2" in runs[1], runs
    for run in runs:
        assert latest_checkpoint(sweep_dir / run).name == "step_00000003"


@pytest.mark.parametrize("model", ["llama_tiny", "hf"])
def test_other_models_train_in_fp8_through_the_same_conversion(tmp_path, cache_dir, model):
    if model == "hf":
        pytest.importorskip("transformers")  # the hf extra; installed by make test / CI
    cfg = tiny_config(tmp_path / "run", f"model={model}", "train.steps=6",
                      "checkpoint.every=0", "logging.log_every=1", f"data.cache_dir={cache_dir}")
    result = train(cfg)
    losses = _losses(tmp_path / "run")
    assert result.step == 6 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    biases = {k for r in read_metrics(tmp_path / "run") for k in r if "/weight/scaling_bias/" in k}
    assert len(biases) >= 2 * 4  # attention and MLP projections of both layers run in FP8
    assert {k.split("/")[1] for k in biases} >= {"q", "k", "v", "attn_out", "ffn_gate", "ffn_up", "ffn_out"}
    assert not any("lm_head" in k for k in biases)  # the output head stays in high precision
