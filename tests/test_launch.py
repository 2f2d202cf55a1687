"""The launch/ scripts: shell syntax of all of them; the SLURM batch script run for real under stand-in
``srun`` / ``scontrol`` (one node, two processes), then again as a requeue would, resuming; the DeepSpeed
launcher starting two CPU processes. Multi-node torchrun is tests/test_multinode.py."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fp8train.trainer.checkpoint import latest_checkpoint
from fp8train.trainer.run_log import read_metrics
from trainer_utils import cli_env

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch"]
VENV_BIN = Path(sys.executable).parent  # torchrun, deepspeed and fp8train of the environment under test
TINY = ("experiment=smoke", "precision=fp8_o2", "logging.progress=false", "logging.log_every=1",
        "train.steps=4", "checkpoint.every=2")

# Stand-ins for SLURM's commands: the allocation is this machine, called localhost; srun records its
# arguments and runs the command once (one node, one task per node).
FAKE_SCONTROL = """#!/bin/sh
[ "$1 $2" = "show hostnames" ] && echo localhost
"""
FAKE_SRUN = """#!/bin/bash
echo "$@" >> "$SRUN_LOG"
while [[ $1 == -* ]]; do shift; done
exec "$@"
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = cli_env(cache_dir)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def joined_lines(text: str) -> list[str]:
    """The script's lines with backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash_and_executable(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/usr/bin/env bash\n")


def test_sbatch_script_runs_one_torchrun_per_node_of_the_trainer():
    text = (LAUNCH / "slurm.sbatch").read_text()
    srun = [line for line in joined_lines(text) if line.startswith("srun ")]
    assert len(srun) == 1, srun
    assert "-m fp8train" in srun[0] and "--rdzv-backend=c10d" in srun[0] and "--ntasks-per-node=1" in srun[0]
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", text, re.M))
    assert {"nodes", "gpus-per-node", "time", "requeue"} <= directives.keys()
    assert "launcher=slurm" in text  # the torchrun-free alternative is documented


@pytest.mark.slow
@pytest.mark.reliability  # ~25 s: a requeue-and-resume scenario (make test-reliability; CI runs it)
def test_sbatch_script_trains_and_a_requeued_job_resumes(tmp_path, cache_dir):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = launch_env(cache_dir, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[01]", SLURM_NNODES="1",
                     SLURM_CPUS_PER_TASK="2", NPROC="2", MASTER_PORT=str(free_port()),
                     SRUN_LOG=str(tmp_path / "srun.log"))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    sbatch = ["bash", str(LAUNCH / "slurm.sbatch"), *TINY]
    # the first job ends at step 2 (a stand-in for preemption); the requeued one runs the same script
    first = subprocess.run([*sbatch, "train.stop_after=2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "outputs/gpt_tiny-fp8_o2"  # the config's deterministic run dir, under the submit dir
    assert latest_checkpoint(run_dir).name == "step_00000002"
    second = subprocess.run(sbatch, cwd=tmp_path, env=dict(env, SLURM_RESTART_COUNT="1"), capture_output=True,
                            text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "on 2 x cpu" in second.stdout
    assert "rendezvous localhost:" in second.stdout and "restart 1" in second.stdout
    assert latest_checkpoint(run_dir).name == "step_00000004"
    assert {"rank0.pt", "rank1.pt"} <= {p.name for p in (run_dir / "checkpoints/step_00000004").iterdir()}
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2, 3, 4]
    srun_args = (tmp_path / "srun.log").read_text().splitlines()
    assert len(srun_args) == 2 and "--nnodes=1 --nproc-per-node=2" in srun_args[0]
    assert "--rdzv-id=4242" in srun_args[0]


@pytest.mark.slow
@pytest.mark.reliability  # ~15 s (make test-reliability; CI runs it)
def test_deepspeed_launcher_runs_two_cpu_processes(tmp_path, cache_dir):
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    env = launch_env(cache_dir, NPROC="2", MASTER_PORT=str(free_port()))
    proc = subprocess.run(["bash", str(LAUNCH / "deepspeed.sh"), *TINY, "launcher.device=cpu",
                           f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "on 2 x cpu" in proc.stdout  # both processes joined one job (not two one-process runs)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    files = {p.name for p in (run_dir / "checkpoints/step_00000004").iterdir()}
    assert {"rank0.pt", "rank1.pt", "model.pt", "trainer.json"} <= files
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2, 3, 4]
