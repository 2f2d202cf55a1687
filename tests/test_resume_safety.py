"""Resume must not corrupt or destroy: a checkpoint is refused by a config
that would read its state as something else (another optimizer, state format, model, data, betas,
DDP vs ZeRO), with one line naming the keys and before anything is written, while steps, schedule,
logging and the like may change; resuming from an earlier checkpoint moves the abandoned
trajectory's checkpoints and metrics aside instead of deleting or keeping them in the way.

Runs are tiny (experiment=smoke, 2 to 6 steps of 4 x 64 tokens, fp8_o2, in-process, 1 rank), built
once per module and copied per test. Tolerance tier: bit-exact (files compared byte for byte,
metrics records by equality): nothing here is arithmetic, only what is kept where."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fp8train.errors import ConfigError
from fp8train.trainer.run import train
from fp8train.trainer.checkpoint import latest_checkpoint
from fp8train.trainer.run_log import read_metrics
from trainer_utils import assert_one_line_error, run_cli, tiny_config

BASE = ("train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=3", "logging.log_every=1", "monitor.plots=false",
        "train.eval_every=0")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, cache_dir) -> Path:
    """A finished 6-step run (checkpoints at 2, 4, 6; a metrics record per step)."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    train(tiny_config(run_dir, *BASE, f"data.cache_dir={cache_dir}"))
    return run_dir


@pytest.fixture
def run_dir(tmp_path, base_run) -> Path:
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---- settings that define the saved state must match --------------------------------------

MISMATCHES = {  # override -> the dotted key the error must name
    "other_optimizer": (("precision.optimizer=adamw",), "precision.optimizer 'fp8_adamw' -> 'adamw'"),
    "other_state_format": (("precision.optim_state.exp_avg_dtype=bf16",), "precision.optim_state.exp_avg_dtype"),
    "other_width": (("model.n_embd=64",), "model.n_embd 128 -> 64"),
    "other_recipe": (("precision=fp8_o1",), "precision.optimizer"),
    "other_data_split": (("data.val_fraction=0.2",), "data.val_fraction"),
    "other_seed": (("seed=1",), "seed 0 -> 1"),
    "other_beta2": (("optim.beta2=0.95",), "optim.beta2"),
    "ddp_to_zero": (("parallel.strategy=zero1",), "parallel.strategy 'auto' (ddp) -> 'zero1' (zero)"),
    "other_rounding": (("precision.optim_state.rounding=stochastic",),
                       "precision.optim_state.rounding 'nearest' -> 'stochastic'"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_setting_that_defines_the_saved_state_is_refused_before_any_write(run_dir, cache_dir, case):
    overrides, named = MISMATCHES[case]
    before = _files(run_dir)
    with pytest.raises(ConfigError, match="resume: checkpoint .* was saved with other settings") as e:
        train(tiny_config(run_dir, *BASE, "train.steps=8", f"data.cache_dir={cache_dir}", *overrides))
    message = str(e.value)
    assert named in message and "\n" not in message and "run_dir" in message and "resume=never" in message, message
    assert _files(run_dir) == before  # nothing written, moved or truncated


ALLOWED = {  # what may change on resume: the run continues from step 6
    "steps_schedule_logging": ("optim.lr=5e-4", "optim.warmup_steps=0", "optim.schedule=constant",
                               "logging.log_every=2", "train.eval_every=4", "checkpoint.keep_last=1",
                               "monitor.every=0", "optim.max_grad_norm=0.5", "name=renamed"),
    "batch_shape": ("train.micro_batch_size=2", "train.grad_accum_steps=2", "parallel.ddp_bucket_mb=1",
                    "precision.comm.bucket_bytes=65536", "precision.fp8.fast_cast=false"),
}


@pytest.mark.parametrize("case", list(ALLOWED))
def test_steps_schedule_logging_and_batch_changes_still_resume(run_dir, cache_dir, capsys, case):
    result = train(tiny_config(run_dir, *BASE, "train.steps=7", f"data.cache_dir={cache_dir}", *ALLOWED[case]))
    assert result.step == 7
    assert "resumed from" in capsys.readouterr().out and latest_checkpoint(run_dir).name == "step_00000007"


def test_a_checkpoint_saved_before_a_config_field_existed_resumes_with_its_default(run_dir, cache_dir):
    # a checkpoint of an earlier version has no precision.optim_state.rounding: it rounded to nearest
    trainer_json = latest_checkpoint(run_dir) / "trainer.json"
    record = json.loads(trainer_json.read_text())
    del record["config"]["precision"]["optim_state"]["rounding"]
    trainer_json.write_text(json.dumps(record))
    assert train(tiny_config(run_dir, *BASE, "train.steps=7", f"data.cache_dir={cache_dir}")).step == 7
    trainer_json = latest_checkpoint(run_dir) / "trainer.json"
    record = json.loads(trainer_json.read_text())
    del record["config"]["precision"]["optim_state"]["rounding"]
    trainer_json.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="precision.optim_state.rounding '<absent>' -> 'stochastic'"):
        train(tiny_config(run_dir, *BASE, "train.steps=8", f"data.cache_dir={cache_dir}",
                          "precision.optim_state.rounding=stochastic"))


def test_zero1_checkpoint_resumes_under_zero2(tmp_path, cache_dir):
    common = ("parallel.strategy=zero1", "train.steps=2", "checkpoint.every=0", "monitor.plots=false",
              f"data.cache_dir={cache_dir}")
    train(tiny_config(tmp_path / "run", *common))
    assert train(tiny_config(tmp_path / "run", *common, "train.steps=3", "parallel.strategy=zero2")).step == 3


def test_the_cli_exits_2_with_one_line_naming_the_keys(run_dir, cache_dir):
    before = _files(run_dir)
    proc = run_cli(["experiment=smoke", f"run_dir={run_dir}", f"data.cache_dir={cache_dir}", "logging.progress=false",
                    "train.steps=8", "precision.optimizer=adamw"], cwd=run_dir.parent, cache_dir=cache_dir)
    assert_one_line_error(proc.returncode, proc.stderr, "precision.optimizer 'fp8_adamw' -> 'adamw'")
    assert _files(run_dir) == before


# ---- an abandoned trajectory is moved aside, not deleted nor left in the way --------------

def test_resuming_from_an_earlier_checkpoint_moves_the_later_ones_and_their_metrics_aside(run_dir, cache_dir,
                                                                                          capsys):
    ckpts = run_dir / "checkpoints"
    old_trainer = {s: (ckpts / f"step_0000000{s}/trainer.json").read_bytes() for s in (4, 6)}
    old_metrics = read_metrics(run_dir)
    capsys.readouterr()
    # a branch from step 2 with another lr (so that it differs), saving every step, stopping after 3
    train(tiny_config(run_dir, *BASE, f"data.cache_dir={cache_dir}", f"resume={ckpts / 'step_00000002'}",
                      "optim.lr=5e-4", "checkpoint.every=1", "train.stop_after=3"))
    out = capsys.readouterr().out
    # the new branch's checkpoints are the run's; keep_last=3 kept step 2 and 3, resume=auto takes 3
    assert sorted(p.name for p in ckpts.iterdir()) == ["abandoned", "step_00000002", "step_00000003"]
    assert latest_checkpoint(run_dir).name == "step_00000003"
    (aside,) = (ckpts / "abandoned").iterdir()
    assert aside.name.startswith("after_step_00000002-") and f"moved to {aside}" in out, out
    assert {s: (aside / f"step_0000000{s}/trainer.json").read_bytes() for s in (4, 6)} == old_trainer
    # metrics: steps <= 2 kept as they were, 3 from the new branch; the old 3..6 in the abandoned file
    (dropped,) = run_dir.glob("metrics.abandoned-*.jsonl")
    assert dropped.name == f"metrics.abandoned-{aside.name}.jsonl" and f"moved to {dropped}" in out, out
    assert [json.loads(line) for line in dropped.read_text().splitlines()] == [r for r in old_metrics if r["step"] > 2]
    now = read_metrics(run_dir)
    assert [r for r in now if r["step"] <= 2] == [r for r in old_metrics if r["step"] <= 2]
    assert {r["step"] for r in now} == {1, 2, 3} and now[-1] != [r for r in old_metrics if r["step"] == 3][-1]


def test_resume_never_keeps_a_copy_of_the_metrics_it_replaces(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    written = "".join(json.dumps({"step": s, "train/loss": 5.0 - s}) + "\n" for s in (1, 2, 3))
    (run_dir / "metrics.jsonl").write_text(written)  # a run that never reached a checkpoint
    train(tiny_config(run_dir, "train.steps=2", "checkpoint.every=0", "monitor.plots=false", "resume=never",
                      f"data.cache_dir={cache_dir}"))
    (dropped,) = run_dir.glob("metrics.abandoned-*.jsonl")
    assert dropped.read_text() == written
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [2]
