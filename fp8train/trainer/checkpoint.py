"""Training checkpoints: everything needed to continue a run bit for bit.

Layout: ``{run_dir}/checkpoints/step_{N:08d}/``
  model.pt, optim.pt             DDP: the model's state_dict (weights + FP8 scaling states of rank 0)
                                 and the replicated optimizer's (moments, Fp8AdamW scales), by rank 0;
  model.pt, optim-rank*-of-*.pt, ZeRO: fp8train.comm.save_zero_checkpoint (state by parameter name,
  manifest.json                  so a run resumes on another world size);
  rank{r}.pt                     per rank: its torch RNG states and its FP8 scaling states (amax
                                 histories: each rank scales its own activations and gradients);
  trainer.json                   written last: step, data position, counters, wandb run id, config.

Atomicity: a checkpoint is written into ``.step_{N}.partial/`` and renamed to ``step_{N}`` only
when every rank has finished its files; the rename is atomic, so ``step_*`` directories are always
complete and a crash leaves at most a ``.partial`` directory (removed by the next save). Saving a
step that exists already (``fp8train._atomic.replace_dir``) moves the old one to ``.step_{N}.old``
first and deletes it only once the new one is in place: between those renames ``latest_checkpoint``
finds the ``.old`` one, and the next run or save puts it back. Older checkpoints beyond
``keep_last`` are deleted only after the new one is in place (renamed to ``.step_{N}.deleting``
first, so a half-deleted one is never taken for a checkpoint).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fp8train._atomic import atomic_torch_save, atomic_write_text, complete_dir, fsync_dir, recover_dir, replace_dir
from fp8train.errors import ConfigError
from fp8train.scaling_state import ScalingState
from fp8train.trainer.distributed import DistEnv, agree

if TYPE_CHECKING:
    from fp8train.trainer.strategy import Strategy

__all__ = ["CHECKPOINTS_DIR", "TRAINER_FILE", "checkpoint_step", "checkpoints_by_step", "latest_checkpoint",
           "load_checkpoint", "resolve_resume", "save_checkpoint", "saved_config"]

CHECKPOINTS_DIR = "checkpoints"
TRAINER_FILE = "trainer.json"
_STEP_RE = re.compile(r"^step_(\d{8})$")
_OLD_RE = re.compile(r"^\.(step_\d{8})\.old$")  # a replace_dir that crashed between its renames


def saved_config(path: Path) -> dict[str, Any] | None:
    """The config a checkpoint was saved with (trainer.json's "config"; None in one that has none).
    A damaged trainer.json: ConfigError naming it, as ``load_checkpoint`` gives for any damaged file."""
    try:
        return json.loads((path / TRAINER_FILE).read_text()).get("config")
    except (OSError, ValueError, AttributeError) as e:
        raise _load_error(path, e) or e from None


def checkpoint_step(path: Path) -> int:
    return int(json.loads((path / TRAINER_FILE).read_text())["step"])


def checkpoints_by_step(run_dir: Path) -> dict[int, Path]:
    """{step: complete checkpoint} under ``run_dir``: ``step_N`` directories holding trainer.json, and
    ``.step_N.old`` where a re-save of step N crashed between its renames. Reads only."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return {}
    found = {}
    for p in root.iterdir():
        name = p.name if _STEP_RE.match(p.name) else (m.group(1) if (m := _OLD_RE.match(p.name)) else None)
        if name is not None and (path := complete_dir(root / name)) is not None and (path / TRAINER_FILE).is_file():
            found[int(name[len("step_"):])] = path
    return dict(sorted(found.items()))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint of the highest step under ``run_dir``, or None."""
    found = checkpoints_by_step(run_dir)
    return found[max(found)] if found else None


def _recover(root: Path) -> None:
    """Rank 0, before it writes under ``root``: finish re-saves that crashed (see ``replace_dir``)."""
    for p in root.iterdir() if root.is_dir() else []:
        if m := _OLD_RE.match(p.name):
            recover_dir(root / m.group(1))


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to start from: ``resume`` = "auto" | "never" | a checkpoint (or run) directory.
    Rank 0 only (it finishes a crashed re-save under ``run_dir``)."""
    _recover(run_dir / CHECKPOINTS_DIR)
    latest = latest_checkpoint(run_dir)
    if resume == "auto":
        return latest
    if resume == "never":
        if latest is not None:
            raise ConfigError(f"resume='never' but run_dir={str(run_dir)!r} already holds checkpoints (latest: "
                              f"{latest.name}); allowed: resume='auto' to continue it, or another run_dir / name")
        return None
    path = Path(resume).expanduser()
    path = complete_dir(path) or path  # step_N's .old copy if its re-save crashed between the renames
    if (path / TRAINER_FILE).is_file():
        return path
    inner = latest_checkpoint(path) if path.is_dir() else None
    if inner is None:
        raise ConfigError(f"resume={resume!r} is not a complete checkpoint (no {TRAINER_FILE}) nor a run directory "
                          "holding one; allowed: 'auto', 'never', or such a path")
    return inner


def _tidy(root: Path) -> None:
    """Rank 0, before a save: finish crashed re-saves, then drop what crashed saves left (hidden
    ``.step_*`` directories: .partial, .deleting, and ZeRO's own temporaries ``..step_*``)."""
    _recover(root)
    for p in root.iterdir() if root.is_dir() else []:
        if p.name.startswith(".") and p.name.lstrip(".").startswith("step_") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _scaling_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{fqn}.{name}": buf for fqn, m in model.named_modules() if isinstance(m, ScalingState)
            for name, buf in m.state_dict().items()}


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(run_dir: Path, step: int, *, strategy: Strategy, model: nn.Module, env: DistEnv,
                    trainer_state: dict[str, Any], keep_last: int,
                    before_commit: Callable[[], None] | None = None) -> Path:
    """Collective: every rank calls it after the same step. Returns the checkpoint's final path.
    ``before_commit`` runs on every rank once all files are written (fault-injection tests)."""
    root = run_dir / CHECKPOINTS_DIR
    final, partial = root / f"step_{step:08d}", root / f".step_{step:08d}.partial"
    ok = False
    try:
        if env.is_main:
            _tidy(root)
            partial.mkdir(parents=True)
        ok = True
    finally:
        agree(ok, "checkpoint: creating the directory", env.device)
    strategy.save(partial)  # collective for ZeRO (it agrees on failures itself)
    ok = False
    try:
        atomic_torch_save({"rng": _rng_state(env.device), "scaling": _scaling_state(model)},
                          partial / f"rank{env.rank}.pt")
        ok = True
    finally:
        agree(ok, "checkpoint: writing rank files", env.device)
    if before_commit is not None:
        before_commit()
    ok = False
    try:
        if env.is_main:
            atomic_write_text(partial / TRAINER_FILE, json.dumps({"step": step, **trainer_state}, indent=1))
            replace_dir(partial, final)  # the same step saved again: the old one goes only once this one is in
            complete = sorted(p for p in root.iterdir() if _STEP_RE.match(p.name))
            for old in complete[:-keep_last]:
                trash = old.with_name(f".{old.name}.deleting")
                old.rename(trash)
                shutil.rmtree(trash)
            fsync_dir(root)
        ok = True
    finally:
        agree(ok, "checkpoint: committing", env.device)
    return final


def _unreadable_file(path: Path) -> Path | None:
    """The first file of checkpoint ``path`` that is damaged: trainer.json / manifest.json that is
    not JSON, or a ``*.pt`` that is not a complete torch.save archive (a zip whose CRCs check)."""
    for f in sorted(path.iterdir()):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".pt":
                with zipfile.ZipFile(f) as archive:
                    if archive.testzip() is not None:
                        return f
        except (OSError, ValueError, zipfile.BadZipFile):
            return f
    return None


def _load_error(path: Path, e: Exception) -> ConfigError | None:
    """One line for a checkpoint that cannot be restored: a damaged file (named), a model it does
    not fit (the first mismatched key of load_state_dict's message), or the error's first line.
    None for another RuntimeError (e.g. a collective that lost a peer): not the checkpoint's fault."""
    if (bad := _unreadable_file(path)) is not None:
        return ConfigError(f"resume: checkpoint file {str(bad)!r} is truncated or corrupt "
                           f"({type(e).__name__}); allowed: a complete checkpoint, or resume='never' with a new run_dir")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if lines and "loading state_dict" in lines[0]:
        detail = (lines[1] if len(lines) > 1 else lines[0])[:300].rstrip(".")
        return ConfigError(f"resume: checkpoint {str(path)!r} does not fit this model (model.*): {detail}; "
                           "allowed: the model config the checkpoint was saved with")
    if isinstance(e, RuntimeError):
        return None
    return ConfigError(f"resume: checkpoint {str(path)!r} cannot be loaded: {type(e).__name__}: "
                       f"{(lines or [''])[0][:300]}")


def load_checkpoint(path: Path, *, strategy: Strategy, model: nn.Module, env: DistEnv) -> dict[str, Any]:
    """Collective: restore model, optimizer, this rank's RNG and FP8 scaling states; returns the
    trainer state (trainer.json). Scaling states and RNG come from this rank's file when the world
    size is unchanged, else from rank 0's (each rank's own history does not exist at the new size).
    A damaged file or a checkpoint of another model: ConfigError naming the file or the first
    mismatched key (the model may then be partly loaded: rebuild it before retrying)."""
    try:
        return _load(path, strategy=strategy, model=model, env=env)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        if (error := _load_error(path, e)) is None:
            raise
        raise error from None


def _load(path: Path, *, strategy: Strategy, model: nn.Module, env: DistEnv) -> dict[str, Any]:
    trainer_state = json.loads((path / TRAINER_FILE).read_text())
    strategy.load(path)
    same_world = trainer_state.get("world_size") == env.world_size
    rank_file = path / f"rank{env.rank if same_world else 0}.pt"
    saved = torch.load(rank_file, map_location="cpu", weights_only=True)
    if saved["scaling"]:
        state = model.state_dict()
        for key, value in saved["scaling"].items():
            state[key].copy_(value)
    if same_world:
        torch.set_rng_state(saved["rng"]["torch"])
        if env.device.type == "cuda" and "cuda" in saved["rng"]:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], env.device)
    return trainer_state
