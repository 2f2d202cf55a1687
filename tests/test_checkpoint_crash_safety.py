"""Saving a checkpoint that exists already: a crash at any point of the
replacement leaves the old or the new checkpoint complete and findable, and the next save cleans up.
Both writers: the trainer's ``save_checkpoint`` and the library's ``save_zero_checkpoint``. A crash is
an exception raised by one of ``fp8train._atomic``'s own directory operations (``_rename``,
``_remove_tree``), patched on rank 0 at the n-th call. gloo, 2 processes.

Tolerance tier: bit-exact (the question is which saved state is found, and whether it is intact)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import fp8train._atomic as atomic
from fp8train._atomic import atomic_write_text
from fp8train.comm import ZeroConfig, ZeroOptimizer, load_zero_checkpoint, save_zero_checkpoint
from fp8train.optim import Fp8AdamW
from fp8train.trainer.checkpoint import (TRAINER_FILE, latest_checkpoint, load_checkpoint, resolve_resume,
                                         save_checkpoint)
from fp8train.trainer.distributed import DistEnv

from dist_utils import run_workers

# (function of fp8train._atomic that fails, its call number): the points of replace_dir on rank 0
CRASH_POINTS = {
    "before_moving_the_old_one_aside": ("_rename", 1),  # final intact, the new one complete beside it
    "between_the_renames": ("_rename", 2),              # final missing, the old one under .old
    "before_deleting_the_old_one": ("_remove_tree", 2),  # the new one in place, .old left over
}
# which save each point leaves findable: the previous one ("old") or the interrupted one ("new")
EXPECTED = {"before_moving_the_old_one_aside": "old", "between_the_renames": "old",
            "before_deleting_the_old_one": "new"}


class _Crash(RuntimeError):
    pass


class _crash_at:  # noqa: N801 - used as a context manager
    """Make ``fp8train._atomic.<name>`` raise at its ``nth`` call on this process (rank 0 only)."""

    def __init__(self, name: str, nth: int, active: bool) -> None:
        self.name, self.nth, self.active, self.calls = name, nth, active, 0

    def __enter__(self) -> None:
        self.original = getattr(atomic, self.name)

        def patched(*args):
            self.calls += 1
            if self.calls == self.nth:
                raise _Crash(f"injected crash at {self.name} call {self.nth}")
            return self.original(*args)

        if self.active:
            setattr(atomic, self.name, patched)

    def __exit__(self, *exc) -> None:
        setattr(atomic, self.name, self.original)


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ---- the trainer's save_checkpoint -----------------------------------------------------------------

class _ValueStrategy:
    """The strategy's part of a checkpoint reduced to one file holding a value (rank 0 writes it)."""

    def __init__(self, rank: int) -> None:
        self.rank, self.value = rank, None

    def save(self, directory: Path) -> None:
        if self.rank == 0:
            atomic_write_text(directory / "value.txt", str(self.value))

    def load(self, directory: Path) -> None:
        self.value = (directory / "value.txt").read_text()


def _trainer_worker(rank: int, world_size: int, run_dir: str, point: str) -> dict[str, object]:
    run_dir = Path(run_dir)
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size,
                  device=torch.device("cpu"))
    model, strategy = nn.Linear(2, 2), _ValueStrategy(rank)

    def save(value: str) -> None:
        strategy.value = value
        save_checkpoint(run_dir, 10, strategy=strategy, model=model, env=env, trainer_state={"value": value},
                        keep_last=2)

    save("old")
    name, nth = CRASH_POINTS[point]
    with _crash_at(name, nth, active=rank == 0), pytest.raises((_Crash, RuntimeError)):
        save("new")  # the same step again (rank 1 hears that rank 0 failed)
    torch.distributed.barrier()
    out: dict[str, object] = {}
    if rank == 0:
        found = latest_checkpoint(run_dir)  # read-only, as evaluate.py uses it beside a running job
        out.update(found=found.name, found_value=json.loads((found / TRAINER_FILE).read_text())["value"])
        resumed = resolve_resume("auto", run_dir)  # the next run: puts a crashed re-save's .old back
        out.update(resumed=resumed.name, hidden_after_resume=_hidden(run_dir / "checkpoints"))
    torch.distributed.barrier()
    reader = _ValueStrategy(rank)
    load_checkpoint(run_dir / "checkpoints/step_00000010", strategy=reader, model=model, env=env)
    out["loaded_value"] = reader.value
    save("again")
    out["after_next_save"] = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    out["value_after_next_save"] = (run_dir / "checkpoints/step_00000010/value.txt").read_text()
    return out


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_a_crashed_resave_of_a_trainer_checkpoint_leaves_one_complete(tmp_path, point):
    expected = EXPECTED[point]
    res = run_workers(_trainer_worker, 2, str(tmp_path / "run"), point, timeout_s=120)
    main = res[0]
    assert main["found_value"] == expected, main
    if point == "between_the_renames":
        assert main["found"] == ".step_00000010.old", main  # found where the crash left it
    assert main["resumed"] == "step_00000010" and main["hidden_after_resume"] in ([], [".step_00000010.partial"]), main
    for r in res:
        assert r["loaded_value"] == expected, r
        assert r["after_next_save"] == ["step_00000010"] and r["value_after_next_save"] == "again", r


# ---- the library's save_zero_checkpoint ------------------------------------------------------------

def _state(zero: ZeroOptimizer) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.clone() for k, v in e["state"].items()} for n, e in zero.state_dict()["param_state"].items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[n].keys() == b[n].keys() and all(a[n][k].dtype == b[n][k].dtype and torch.equal(
            a[n][k].reshape(-1).view(torch.uint8), b[n][k].reshape(-1).view(torch.uint8)) for k in a[n]) for n in a)


def _zero_worker(rank: int, world_size: int, directory: str, point: str) -> dict[str, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    zero = ZeroOptimizer(model.named_parameters(), lambda ps: Fp8AdamW(ps, lr=1e-2), config=ZeroConfig(stage=2))

    def step() -> dict:
        zero.zero_grad()
        model(torch.randn(4, 16, generator=torch.Generator().manual_seed(rank))).pow(2).mean().backward()
        zero.step()
        return _state(zero)

    states = {"old": step()}
    save_zero_checkpoint(zero, model, directory)
    states["new"] = step()
    name, nth = CRASH_POINTS[point]
    with _crash_at(name, nth, active=rank == 0), pytest.raises((_Crash, RuntimeError)):
        save_zero_checkpoint(zero, model, directory)
    torch.distributed.barrier()

    def loaded() -> str:
        fresh = ZeroOptimizer(model.named_parameters(), lambda ps: Fp8AdamW(ps, lr=1.0), config=ZeroConfig(stage=2))
        load_zero_checkpoint(fresh, model, directory)
        return next((k for k, s in states.items() if _same(_state(fresh), s)), "neither")

    out = {"loaded": loaded()}
    torch.distributed.barrier()
    states["again"] = step()
    save_zero_checkpoint(zero, model, directory)
    out.update(loaded_after_next_save=loaded(), beside=sorted(os.listdir(Path(directory).parent)))
    return out


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_a_crashed_resave_of_a_zero_checkpoint_leaves_one_complete(tmp_path, point):
    for res in run_workers(_zero_worker, 2, str(tmp_path / "ckpt"), point, timeout_s=120):
        assert res["loaded"] == EXPECTED[point], res
        assert res["loaded_after_next_save"] == "again" and res["beside"] == ["ckpt"], res
