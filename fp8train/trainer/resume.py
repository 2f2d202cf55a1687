"""Resuming without corrupting or destroying anything: which settings a checkpoint fixes, and where
a resumed run puts the checkpoints of the trajectory it abandons.

Settings a checkpoint fixes (``check_resume_config``; a mismatch is a ConfigError naming each
differing key, before anything is written):
  model.*                  the weights' shapes and the FP8 scaling states the checkpoint holds
                           (model.name is a label and may change);
  precision.*              the FP8 conversion and recipe, the optimizer (torch AdamW or Fp8AdamW) and
                           its state formats: another one would read the saved state as something
                           else (may change: the label precision.name, and what only sets how the
                           work is done: precision.comm.bucket_bytes, exchange, p2p_piece_bytes,
                           stats_every, precision.fp8.fast_cast);
  data.path, data.bin_dtype, data.tokenizer, data.val_fraction, seed
                           the token stream, its train/val split and the shuffled order in which
                           the saved data position counts;
  optim.beta1, beta2, eps, weight_decay
                           saved in the optimizer's param groups, which loading restores over the
                           new values: a change would be silently ignored;
  parallel.strategy        DDP (one optim.pt) vs ZeRO (per-rank files by parameter name): neither
                           reads the other's files; zero1 <-> zero2 is allowed (same files).
Everything else may change on resume: train.* (steps, stop_after, batch sizes), optim.lr, min_lr,
warmup_steps, schedule, max_grad_norm, logging, monitor, checkpoint, launcher (and the world size),
faults, parallel.ddp_bucket_mb, data.name, data.cache_dir, name, run_dir, resume.

Abandoned trajectory (``set_aside_later_checkpoints``): resuming from step S moves the run's
checkpoints of later steps into ``checkpoints/abandoned/<tag>/`` (never counted by keep_last,
never chosen by resume=auto); metrics.jsonl records of later steps go to
``metrics.abandoned-<tag>.jsonl`` (``fp8train.trainer.run_log``). Nothing is deleted.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fp8train._atomic import fsync_dir
from fp8train.errors import ConfigError
from fp8train.trainer.checkpoint import CHECKPOINTS_DIR, checkpoints_by_step
from fp8train.trainer.config import TrainConfig, train_config_from_mapping, train_config_to_mapping

__all__ = ["ABANDONED_DIR", "FIXED_KEYS", "abandon_tag", "check_resume_config", "set_aside_later_checkpoints"]

ABANDONED_DIR = "abandoned"
# dotted keys (a key fixes everything under it) that must match the checkpoint's config
FIXED_KEYS = ("model", "precision", "data.path", "data.bin_dtype", "data.tokenizer", "data.val_fraction", "seed",
              "optim.beta1", "optim.beta2", "optim.eps", "optim.weight_decay")
_MAY_CHANGE = ("model.name", "precision.name", "precision.comm.bucket_bytes", "precision.comm.exchange",
               "precision.comm.p2p_piece_bytes", "precision.comm.stats_every", "precision.fp8.fast_cast")
_ABSENT = "<absent>"


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _fixed(key: str) -> bool:
    return key not in _MAY_CHANGE and any(key == k or key.startswith(k + ".") for k in FIXED_KEYS)


def _layout(plain: Mapping[str, Any]) -> str:
    """"ddp" or "zero": the optimizer files' layout (parallel.strategy, with "auto" resolved)."""
    try:  # TrainConfig owns the resolution of "auto"; defaults for everything but these two groups
        strategy = train_config_from_mapping({k: plain[k] for k in ("parallel", "precision") if k in plain}).strategy
    except ConfigError:  # a config of another fp8train version: take the raw value
        strategy = str(plain.get("parallel", {}).get("strategy", "auto"))
    return "zero" if strategy in ("zero1", "zero2") else strategy


def check_resume_config(saved: Mapping[str, Any] | None, cfg: TrainConfig, checkpoint: Path) -> None:
    """ConfigError (one line) if ``cfg`` differs from ``saved`` (the checkpoint's config) in a setting
    that defines the saved state (module docstring). ``saved`` None (a checkpoint without its
    config): nothing to compare."""
    if saved is None:
        return
    new = json.loads(json.dumps(train_config_to_mapping(cfg)))  # as trainer.json holds it (tuples are lists)
    old_flat, new_flat = _flatten(saved), _flatten(new)
    # a field added since the checkpoint was saved, set to its default, is what that run did
    defaults = _flatten(json.loads(json.dumps(train_config_to_mapping(train_config_from_mapping({})))))
    diffs = [f"{k} {old_flat.get(k, _ABSENT)!r} -> {new_flat.get(k, _ABSENT)!r}"
             for k in sorted(old_flat.keys() | new_flat.keys())
             if _fixed(k) and old_flat.get(k, _ABSENT) != new_flat.get(k, _ABSENT)
             and not (k not in old_flat and k in defaults and new_flat.get(k) == defaults[k])]
    if _layout(saved) != _layout(new):
        diffs.append(f"parallel.strategy {saved.get('parallel', {}).get('strategy')!r} ({_layout(saved)}) -> "
                     f"{new['parallel']['strategy']!r} ({_layout(new)})")
    if diffs:
        raise ConfigError(f"resume: checkpoint {str(checkpoint)!r} was saved with other settings that define its "
                          f"state: {'; '.join(diffs)}; allowed: the saved values to resume it, or a new run (another "
                          "run_dir or name, or resume=never where run_dir holds no checkpoint)")


def abandon_tag(step: int) -> str:
    """Names what a resume from ``step`` sets aside: the step and the time (UTC), unique per resume."""
    return f"after_step_{step:08d}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S.%fZ}"


def set_aside_later_checkpoints(run_dir: Path, step: int, tag: str) -> Path | None:
    """Rank 0, once the checkpoint of ``step`` is loaded: move the checkpoints of later steps into
    ``checkpoints/abandoned/<tag>/`` (a rename each: nothing copied, nothing deleted). Returns that
    directory, or None when there were none."""
    later = [path for s, path in checkpoints_by_step(run_dir).items() if s > step]
    if not later:
        return None
    target = run_dir / CHECKPOINTS_DIR / ABANDONED_DIR / tag
    target.mkdir(parents=True)
    for path in later:
        os.replace(path, target / path.name.removeprefix(".").removesuffix(".old"))
    fsync_dir(target)
    fsync_dir(run_dir / CHECKPOINTS_DIR)
    return target
