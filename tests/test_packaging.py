"""Layout and install contract (DESIGN.md §1): optim/ and comm/ ship only as fp8train.optim and
fp8train.comm; configs travel in the wheel; importing fp8train patches nothing in torch."""

from __future__ import annotations

import importlib.util
import json
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


def test_wheel_contains_only_the_fp8train_namespace(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=240)
    (wheel,) = tmp_path.glob("fp8train-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {n.split("/")[0] for n in names}
    assert {t for t in top_levels if not t.endswith(".dist-info")} == {"fp8train"}
    assert "fp8train/comm/__init__.py" in names and "fp8train/optim/__init__.py" in names
    assert "fp8train/configs/precision/fp8.yaml" in names
    assert "fp8train/optim/csrc/fp8adamw.c" in names  # the optimizer's C kernel builds from the wheel


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
