"""Reliability of the ``fp8train`` command on bad inputs, a changing world size and a hanging rank.

A. Bad input (beyond tests/test_cli.py's table): each case runs as a real subprocess, all started
   at once; each must exit 2 with ONE stderr line naming the problem and leave nothing behind. The
   checkpoint cases continue a copy of a finished run IN PLACE (``hydra.run.dir=run``), so "nothing
   written" is checked as: every file of that run directory is byte-identical afterwards. Two
   VALID inputs run in the same batch: odd batch sizes, and E4M3 output gradients (a warning, once).
B. A ZeRO-2 FP8 run (fp8_o3) stopped and resumed on 4 -> 2 -> 1 processes at a constant global
   batch follows an uninterrupted run within the FP8 tolerance.
C. A rank that stops answering makes the others fail with the one-line timeout error, in bounded time.

Marked ``reliability`` (``pytest -m reliability``); the default suite deselects them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fp8train.errors import ConfigError
from fp8train.trainer.run_log import read_metrics
from trainer_utils import assert_one_line_error, cli_env, popen_cli

pytestmark = pytest.mark.reliability

SMOKE = ["experiment=smoke", "train.steps=2", "logging.progress=false", "monitor.plots=false"]
E4M3_WARNING = "Fp8Config.grad_output_format='e4m3'"


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garbage(data: bytes) -> bytes:
    return bytes(range(256)) * 8


# (id, extra args, files to create first {name: bytes}, checkpoint files to corrupt {name: fn} or None
#  (None: no run directory; {}: an intact copy of the base run), text the error line must contain)
CASES = [
    ("negative_lr", ["optim.lr=-1"], {}, None, "OptimConfig.lr=-1"),
    ("zero_micro_batch", ["train.micro_batch_size=0"], {}, None, "LoopConfig.micro_batch_size=0 is out of range"),
    ("zero_grad_accum", ["train.grad_accum_steps=0"], {}, None, "LoopConfig.grad_accum_steps=0 is out of range"),
    ("negative_grad_accum", ["train.grad_accum_steps=-2"], {}, None, "LoopConfig.grad_accum_steps=-2 is out of range"),
    # n_embd=72: qkv 72x216, proj 72x72, mlp 72x288 / 288x72 -- no dim a multiple of 16
    ("fp8_no_eligible_layer", ["model.n_embd=72", "model.n_head=4"], {}, None,
     "precision.gemm='fp8' but no Linear layer of the model is eligible for FP8"),
    ("data_binary_text", ["data=custom", "data.path=ids.txt"], {"ids.txt": b"".join((i % 300).to_bytes(2, "little") for i in range(8192))}, None,
     "data.path='ids.txt' looks binary"),
    ("data_bin_odd_bytes", ["data=custom", "data.path=ids.bin", "data.bin_dtype=uint16"], {"ids.bin": b"abc"}, None,
     "not a multiple of data.bin_dtype='uint16'"),
    ("data_path_is_directory", ["data=custom", "data.path=."], {}, None, "data.path='.' does not exist or is not a file"),
    ("resume_truncated_model", [], {}, {"model.pt": _truncate}, "model.pt"),
    ("resume_garbage_model", [], {}, {"model.pt": _garbage}, "model.pt"),
    ("resume_truncated_optim", [], {}, {"optim.pt": _truncate}, "optim.pt"),
    ("resume_garbage_rank_file", [], {}, {"rank0.pt": _garbage}, "rank0.pt"),
    ("resume_garbage_trainer_json", [], {}, {"trainer.json": lambda _: b"{not json"}, "trainer.json"),
    ("resume_other_width", ["model.n_embd=64"], {}, {}, "was saved with other settings that define its state: model.n_embd 128 -> 64"),
    ("resume_other_arch", ["model=llama_tiny"], {}, {}, "model.arch 'gpt' -> 'llama'"),
]
# valid inputs that must NOT fail: (id, extra args, check of stderr)
VALID = [
    ("odd_batch_sizes", ["train.micro_batch_size=3", "train.grad_accum_steps=3", "checkpoint.every=0"]),
    ("e4m3_grad_output", ["precision.fp8.grad_output_format=e4m3", "checkpoint.every=0"]),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished 2-step run with one checkpoint (step 2), the source of every checkpoint case."""
    cache = tmp_path_factory.mktemp("cache")
    run = tmp_path_factory.mktemp("base") / "run"
    proc = subprocess.run([sys.executable, "-m", "fp8train", *SMOKE, "checkpoint.every=2", f"hydra.run.dir={run}",
                           f"data.cache_dir={cache}"], env=cli_env(cache), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, base_run):
    """Start every case in its own directory, then collect (returncode, stderr, changed files)."""
    cache = tmp_path_factory.mktemp("cache")
    procs = {}
    for case_id, args, files, corrupt in [c[:4] for c in CASES] + [(v[0], v[1], {}, None) for v in VALID]:
        cwd = tmp_path_factory.mktemp(case_id)
        for name, data in files.items():
            (cwd / name).write_bytes(data)
        if corrupt is not None:
            shutil.copytree(base_run, cwd / "run")
            (ckpt,) = (cwd / "run" / "checkpoints").iterdir()
            for name, fn in corrupt.items():
                (ckpt / name).write_bytes(fn((ckpt / name).read_bytes()))
            args = [*args, "hydra.run.dir=run"]
        before = _snapshot(cwd)
        procs[case_id] = (cwd, before, popen_cli([*SMOKE, *args], cwd, cache))
    results = {}
    for case_id, (cwd, before, proc) in procs.items():
        _, stderr = proc.communicate(timeout=400)
        after = _snapshot(cwd)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        results[case_id] = (proc.returncode, stderr, changed)
    return results


@pytest.mark.parametrize("message", [c[4] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line_and_writes_nothing(outcomes, request, message):
    case_id = request.node.callspec.id
    returncode, stderr, changed = outcomes[case_id]
    assert_one_line_error(returncode, stderr, message)
    assert changed == [], changed  # no new file, no overwritten byte (checkpoint cases: the run dir as it was)


def test_odd_batch_sizes_are_valid(outcomes):
    returncode, stderr, changed = outcomes["odd_batch_sizes"]
    assert returncode == 0, stderr
    assert any(name.endswith("metrics.jsonl") for name in changed), changed


def test_e4m3_output_gradients_run_with_one_warning(outcomes):
    returncode, stderr, _ = outcomes["e4m3_grad_output"]
    assert returncode == 0, stderr
    assert stderr.count(E4M3_WARNING) == 1, stderr


@pytest.mark.parametrize(("n_tensors", "world_size", "strategy", "ok"), [
    (10, 4, "zero2", True), (4, 4, "zero1", True), (3, 4, "zero2", False), (1, 2, "zero1", False),
    (1, 2, "ddp", True),  # DDP replicates everything: no rank can own nothing
], ids=["many", "equal", "fewer_zero2", "fewer_zero1", "ddp"])
def test_zero_world_size_above_tensor_count_is_a_config_error(n_tensors, world_size, strategy, ok):
    # a torchrun case would need a model with fewer trainable tensors than ranks (>= 2): no config
    # of ours builds one, so the check is tested directly
    from fp8train.trainer.run import check_zero_world_size

    if ok:
        check_zero_world_size(strategy, n_tensors=n_tensors, world_size=world_size)
    else:
        with pytest.raises(ConfigError, match=f"parallel={strategy} on {world_size} processes"):
            check_zero_world_size(strategy, n_tensors=n_tensors, world_size=world_size)


# ---------------------------------------------------------------------------------------------- B


def _torchrun(nproc: int, args: list[str], cwd: Path, cache: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "fp8train", *args, f"data.cache_dir={cache}"]
    return subprocess.Popen(cmd, cwd=cwd, env=cli_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return proc.returncode, out, err


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


RESHARD = ["experiment=smoke", "precision=fp8_o3", "train.steps=18", "checkpoint.every=6", "logging.log_every=1",
           "logging.progress=false", "monitor.plots=false", "monitor.every=0", "launcher.cpu_threads=1",
           "train.eval_every=0", "train.eval_batches=1"]


def test_zero2_resume_on_4_then_2_then_1_processes_tracks_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    # the reference runs beside the 4-process leg (1 process x 4 sequences: the same global batch)
    ref = _torchrun(1, [*RESHARD, "train.micro_batch_size=4", f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path, cache)
    run = tmp_path / "run"
    for nproc, stop in ((4, 6), (2, 12), (1, 18)):
        code, out, err = _finish(_torchrun(nproc, [*RESHARD, f"train.micro_batch_size={4 // nproc}",
                                                   f"train.stop_after={stop}", f"hydra.run.dir={run}"],
                                           tmp_path, cache), timeout=300)
        assert code == 0, (nproc, err[-3000:])
        assert max(_losses(run)) == stop, (nproc, out[-2000:])
    code, _, err = _finish(ref, timeout=300)
    assert code == 0, err[-3000:]
    resumed, reference = _losses(run), _losses(tmp_path / "ref")
    assert sorted(resumed) == sorted(reference) == list(range(1, 19))
    # Tolerance: the same windows and the same optimizer math, but the FP8 gradient reduction is a
    # sum of N E4M3-quantized chunks (N = world size: 4, 2, 1 here; 1 in the reference), so the
    # gradients round differently and the weights drift apart by a few FP8 ulps. Observed on CPU:
    # at most 1.8e-4 relative over 18 steps (losses 5.51 -> 3.67). 2e-3 leaves 10x headroom and
    # still catches a wrong data position or a lost optimizer state, which move a step's loss by
    # percents (the loss falls ~2 % per step early on).
    for step in range(1, 19):
        assert abs(resumed[step] - reference[step]) <= 2e-3 * abs(reference[step]), (step, resumed, reference)


# ---------------------------------------------------------------------------------------------- C


def test_hanging_rank_fails_with_one_line_timeout(tmp_path):
    timeout_s, bound_s = 15, 120
    start = time.monotonic()
    proc = _torchrun(2, [*SMOKE[:1], "train.steps=6", "logging.progress=false", "monitor.plots=false",
                         "checkpoint.every=0", "faults.hang_step=3", "faults.hang_rank=1",
                         f"launcher.timeout_s={timeout_s}", "launcher.cpu_threads=1",
                         f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, tmp_path / "cache")
    try:
        code, out, err = _finish(proc, timeout=bound_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    elapsed = time.monotonic() - start
    assert elapsed < bound_s, f"no timeout after {elapsed:.0f} s"
    assert code != 0
    assert "faults: rank 1 stops answering at step 3" in out
    errors = [line for line in err.splitlines() if line.startswith("fp8train: error: ")]
    assert len(errors) == 1, err[-3000:]
    assert f"a collective timed out after launcher.timeout_s={timeout_s} s" in errors[0]
