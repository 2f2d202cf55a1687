"""Layout and install contract (docs/design.md, Wings and layers): optim/ and comm/ ship only as fp8train.optim and
fp8train.comm; configs travel in the wheel; importing fp8train patches nothing in torch."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_subpackages_import_inside_the_fp8train_namespace() -> None:
    import fp8train.comm
    import fp8train.configs
    import fp8train.optim

    assert Path(fp8train.comm.__file__).parent.name == "comm"
    assert Path(fp8train.optim.__file__).parent.name == "optim"
    assert Path(fp8train.configs.__file__).parent.name == "configs"


@pytest.mark.parametrize("name", ["comm", "optim", "configs"])
def test_no_top_level_module_comes_from_this_project(name: str) -> None:
    spec = importlib.util.find_spec(name)
    if spec is not None:  # e.g. Jupyter's comm may be installed: it must not be ours
        origin = Path(spec.origin or next(iter(spec.submodule_search_locations))).resolve()
        assert REPO not in origin.parents, f"top-level {name!r} resolves into this repo: {origin}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a clean copy of the source tree (a stale build/ folder in the checkout
    would otherwise leak deleted files into it)."""
    src = tmp_path_factory.mktemp("src") / "fp8train"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", "build", "dist", ".git", "*.egg-info",
                                                             "__pycache__", "outputs", "multirun", "wandb"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=240)
    (built,) = out.glob("fp8train-*.whl")
    return built


def test_wheel_contains_only_the_fp8train_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {n.split("/")[0] for n in names}
    assert {t for t in top_levels if not t.endswith(".dist-info")} == {"fp8train"}
    assert "fp8train/comm/__init__.py" in names and "fp8train/optim/__init__.py" in names
    assert "fp8train/optim/csrc/fp8adamw.c" in names  # the optimizer's C kernel builds from the wheel
    assert {f"fp8train/optim/csrc/{h.name}" for h in (REPO / "optim" / "csrc").glob("*.h")} <= set(names)  # its headers
    configs = {n.removeprefix("fp8train/configs/") for n in names if n.startswith("fp8train/configs/")}
    shipped = {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped and shipped <= configs  # every config group and preset travels in the wheel
    # the three wings and ZeRO's subpackage ship; test fixtures do not
    for package in ("trainer", "ptq", "comm/zero"):
        assert f"fp8train/{package}/__init__.py" in names
    assert not [n for n in names if Path(n).stem in {"synthetic", "gloo_spawn", "netns_utils", "conftest"}]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fp8train = fp8train.trainer.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_command_trains_from_any_directory(wheel: Path, tmp_path: Path) -> None:
    """``pip install`` the wheel (into a target dir; dependencies come from this env) and run the
    ``fp8train`` console script from an unrelated directory: configs resolve from the package."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=240)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    script = site / "bin" / "fp8train"
    proc = subprocess.run([sys.executable, str(script), "experiment=smoke", "train.steps=2", "logging.progress=false",
                           "precision=fp8_o1"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = elsewhere / "outputs" / "gpt_tiny-fp8_o1"
    assert (run_dir / "checkpoints" / "step_00000002" / "trainer.json").is_file()
    where = subprocess.run([sys.executable, "-c", "import fp8train; print(fp8train.__file__)"], env=env,
                           cwd=elsewhere, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site))  # the run above used the installed wheel, not the checkout


def test_import_patches_nothing_in_torch() -> None:
    probe = (
        "import json, torch, torch.nn.functional as F, torch.nn as nn\n"
        "snap = lambda: {m.__name__: {k: id(v) for k, v in vars(m).items()} for m in (torch, F, nn, torch.Tensor)}\n"
        "before = snap(); import fp8train, fp8train.comm, fp8train.optim; after = snap()\n"
        "print(json.dumps({m: sorted(k for k in before[m] if before[m][k] != after[m].get(k)) for m in before}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=120)
    changed = json.loads(out.stdout.strip().splitlines()[-1])
    assert changed == {m: [] for m in changed}
