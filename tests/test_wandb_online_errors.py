"""``logging=wandb_online`` without credentials, or with credentials but no way to reach wandb: one
stderr line naming the fix, exit status 2, and nothing left in the working directory (no run
directory, no metrics.jsonl, no half-made wandb run). This machine has no network, so an API key
that is set can only fail at ``wandb.init``; WANDB_INIT_TIMEOUT keeps that wait short."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer_utils import assert_one_line_error, cli_env

SMOKE = ["experiment=smoke", "train.steps=2", "logging.progress=false", "logging=wandb_online"]
FIX = "fix: `wandb login` or set WANDB_API_KEY, or use logging=wandb_offline and `wandb sync` later"

# (id, environment changes: None removes the variable, text the error line must contain)
CASES = [
    ("no_api_key", {"WANDB_API_KEY": None}, "no wandb API key found"),
    ("unreachable_with_key", {"WANDB_API_KEY": "0123456789abcdef" * 2 + "01234567"}, "wandb.init failed"),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Run every case at once, each in an empty directory with an empty HOME (no ~/.netrc, no
    wandb settings), and collect (returncode, stderr, files left in the working directory)."""
    cache = tmp_path_factory.mktemp("cache")
    procs = {}
    for case_id, changes, _ in CASES:
        cwd, home = tmp_path_factory.mktemp(case_id), tmp_path_factory.mktemp(f"{case_id}_home")
        env = dict(cli_env(cache), HOME=str(home), WANDB_INIT_TIMEOUT="3")
        for key in ("NETRC", "WANDB_CONFIG_DIR", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DIR"):
            env.pop(key, None)
        for key, value in changes.items():
            env.pop(key, None) if value is None else env.__setitem__(key, value)
        cmd = [sys.executable, "-m", "fp8train", *SMOKE, f"data.cache_dir={cache}"]
        procs[case_id] = (cwd, subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True))
    results = {}
    for case_id, (cwd, proc) in procs.items():
        _, stderr = proc.communicate(timeout=180)
        results[case_id] = (proc.returncode, stderr, sorted(str(p.relative_to(cwd)) for p in Path(cwd).rglob("*")))
    return results


@pytest.mark.parametrize("message", [c[2] for c in CASES], ids=[c[0] for c in CASES])
def test_wandb_online_failure_is_one_line_naming_the_fix(outcomes, request, message: str) -> None:
    returncode, stderr, leftovers = outcomes[request.node.callspec.id]
    assert_one_line_error(returncode, stderr, message)
    assert "logging.wandb='online'" in stderr and FIX in stderr, stderr
    assert leftovers == [], leftovers  # no run directory, no half-written metrics or wandb files


def test_cleanup_removes_only_what_the_failed_invocation_added(tmp_path: Path) -> None:
    from fp8train.trainer.cli import _remove_created, _tree

    run = tmp_path / "outputs" / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    old = {run / "config.yaml": b"old config", run / "metrics.jsonl": b'{"step": 10}\n',
           run / "checkpoints" / "step_00000010" / "model.pt": b"weights"}
    for path, data in old.items():
        path.write_bytes(data)
    before = _tree(run)
    # what a failing wandb.init leaves: a run folder, logs, a latest-run link; plus a new checkpoint file
    made = run / "wandb" / "run-20260101_000000-abc" / "logs"
    made.mkdir(parents=True)
    (made / "debug.log").write_text("log")
    (run / "wandb" / "latest-run").symlink_to(made.parent)
    (run / "checkpoints" / "step_00000010" / "extra.tmp").write_bytes(b"x")
    _remove_created(run, before)
    assert _tree(run) == before and all(path.read_bytes() == data for path, data in old.items())
