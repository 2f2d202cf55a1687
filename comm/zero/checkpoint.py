"""ZeRO checkpoints on disk, keyed by parameter NAME, so that a run saved on N ranks resumes on any M
(docs/design.md).

Layout of a checkpoint directory:
    optim-rank{r}-of-{N}.pt  rank r's ``ZeroOptimizer.state_dict()``: the optimizer state of the
                             parameters it owns under the N-rank partition, by name, each tensor
                             in the dtype the inner optimizer holds it (e4m3 m, fp16 v, ...);
    model.pt                 ``model.state_dict()`` (identical on every rank after a ZeRO step, so
                             rank 0 writes it);
    manifest.json            written LAST by rank 0, once every rank has reported its files
                             written: world size, step() calls, skipped steps, the inner optimizer
                             and its state formats, and which file holds each parameter's state.
A directory without manifest.json is an incomplete checkpoint; loading it raises. A save writes
the whole checkpoint into ``.{name}.partial`` beside ``directory`` (each file fsync'ed), and rank 0
then swaps it in (``fp8train._atomic.replace_dir``): an existing ``directory`` is renamed to
``.{name}.old``, the new one to ``directory``, and only then is the old one deleted. A crash at any
point leaves a complete checkpoint: the old or the new one under ``directory``, or the old one
under ``.{name}.old`` between the two renames (loading falls back to it; the next save puts it
back). ``directory`` is replaced as a whole: keep nothing else in it.

Loading on M ranks: every rank reads the manifest, computes its owned parameters under the NEW
partition, and reads only the files that hold them (M < N: a few files each; M > N: ranks share a
file). Whole tensors never need resharding, only re-routing by name.

Files are ``torch.save`` archives, read back with ``torch.load(weights_only=True)`` (no arbitrary
code on load). Not safetensors: the state is a nested dict with non-tensor values (hyperparameters,
betas tuples, format names, counters) that safetensors would need flattened into string metadata,
and torch.save keeps every dtype, FP8 included, with no extra dependency.

Why not ``torch.distributed.checkpoint`` (DCP): DCP reshards tensors described as DTensor /
ShardedTensor shards and loads *in place* into a state dict whose tensors must already exist with
the right shape and dtype. Here each tensor is whole on one owner, so nothing needs resharding,
and the inner optimizer creates its state lazily at its first step (a fresh optimizer has nothing
to load into); DCP would need that state pre-created, with its formats, on every load. Our files
are plain torch archives plus a JSON manifest one can read with ``cat``; DCP's metadata format is
its own and has changed between torch releases.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fp8train._atomic import atomic_torch_save as _atomic_torch_save
from fp8train._atomic import atomic_write as _atomic_write
from fp8train._atomic import complete_dir, recover_dir, replace_dir
from fp8train.comm._agree import run_collectively
from fp8train.comm.zero._named_state import optimizer_formats
from fp8train.comm.zero.optimizer import ZeroOptimizer

__all__ = ["MANIFEST_NAME", "load_zero_checkpoint", "read_zero_manifest", "save_zero_checkpoint"]

MANIFEST_NAME = "manifest.json"
_MODEL_FILE = "model.pt"
_FORMAT = "fp8train.zero_checkpoint"
_VERSION = 1


def _optim_file(rank: int, world_size: int) -> str:
    return f"optim-rank{rank}-of-{world_size}.pt"


def _collectively(zero_opt: ZeroOptimizer, what: str, fn: Callable[[], Any]) -> Any:
    """``fn`` on every rank of ``zero_opt``'s group, failures agreed (``comm._agree``): so no rank goes
    on to wait for another in a later collective or resumes alone."""
    return run_collectively(what, fn, device=zero_opt.params[0].device, group=zero_opt.group)


def _partial_dir(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def save_zero_checkpoint(zero_opt: ZeroOptimizer, model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Collective: every rank of ``zero_opt.group`` calls it after the same step. Writes the layout
    in the module docstring into ``.{name}.partial`` beside ``directory``, then replaces
    ``directory`` with it (created if needed), and returns its path."""
    path = Path(directory)
    partial = _partial_dir(path)
    rank, world_size = zero_opt.rank, zero_opt.world_size

    def start() -> None:
        if rank == 0:
            recover_dir(path)  # a previous save that crashed between its renames
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)

    def write_shard() -> None:
        _atomic_torch_save(zero_opt.state_dict(), partial / _optim_file(rank, world_size))
        if rank == 0:
            _atomic_torch_save(model.state_dict(), partial / _MODEL_FILE)

    _collectively(zero_opt, "save_zero_checkpoint (start)", start)
    _collectively(zero_opt, "save_zero_checkpoint (writing state)", write_shard)

    def write_manifest() -> None:
        if rank != 0:
            return
        sd = zero_opt.state_dict()
        manifest = {
            "format": _FORMAT, "version": _VERSION, "world_size": world_size,
            "step_calls": sd["step_calls"], "skipped_steps": sd["skipped_steps"],
            "optimizer": sd["formats"]["optimizer"], "state_formats": sd["formats"]["state_formats"],
            "file_format": "torch.save; torch.load(weights_only=True)", "model_file": _MODEL_FILE,
            "param_files": {name: _optim_file(owner, world_size)
                            for name, owner in zip(zero_opt.names, zero_opt.partition.owner)},
        }
        _atomic_write(partial / MANIFEST_NAME, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        replace_dir(partial, path)

    _collectively(zero_opt, "save_zero_checkpoint (manifest and commit)", write_manifest)
    return path


def read_zero_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete checkpoint; FileNotFoundError (one line) for an incomplete one."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{Path(directory)} is not a complete ZeRO checkpoint: {MANIFEST_NAME} is missing "
                                "(the save did not finish, or this is not a checkpoint directory)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != _FORMAT or manifest.get("version") != _VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                         f"expected {_FORMAT!r} version {_VERSION}")
    return manifest


def load_zero_checkpoint(zero_opt: ZeroOptimizer, model: torch.nn.Module,
                         directory: str | os.PathLike) -> dict[str, Any]:
    """Collective: every rank of ``zero_opt.group`` calls it. Loads the model weights and the
    optimizer state of the parameters this rank owns under ITS partition, whatever the world size
    at save time. Returns the manifest. Raises on every rank if it fails on any; a missing name, a
    missing file or another optimizer or format is found before anything is loaded, while a model
    that does not match the weights (strict ``load_state_dict``) raises after the optimizer state
    was loaded: rebuild both before retrying."""
    path = complete_dir(directory) or Path(directory)  # .{name}.old if a save crashed between renames
    device = zero_opt.params[0].device
    mine = optimizer_formats(zero_opt.optimizer)

    def load() -> dict[str, Any]:
        manifest = read_zero_manifest(path)
        files: list[str] = []
        for name in zero_opt.owned_parameter_names:
            if name not in manifest["param_files"]:
                raise ValueError(f"load_zero_checkpoint: {path} holds no optimizer state for parameter {name!r}")
            if manifest["param_files"][name] not in files:
                files.append(manifest["param_files"][name])
        param_state: dict[str, Any] = {}
        first: dict[str, Any] | None = None
        for file in sorted(files):
            shard = torch.load(path / file, map_location=device, weights_only=True)
            saved = shard.get("formats", {})  # checked per shard too: a manifest by an owner-less rank 0 names none
            if mine["optimizer"] is not None and saved.get("optimizer") is not None and saved != mine:
                raise ValueError(f"load_zero_checkpoint: {path / file} holds {saved['optimizer']} state with formats "
                                 f"{saved['state_formats']}; this rank's optimizer is {mine['optimizer']} with "
                                 f"{mine['state_formats']}")
            param_state.update(shard["param_state"])
            first = first or shard
        weights = torch.load(path / manifest["model_file"], map_location=device, weights_only=True)
        # the optimizer first: it checks the formats and every owned name before changing anything
        zero_opt.load_state_dict({
            "param_state": param_state,
            # rank-local extras (Fp8AdamW: formats, own skip count) from the lowest saved rank read
            "extra": first["extra"] if first else {},
            "formats": {"optimizer": manifest["optimizer"], "state_formats": manifest["state_formats"]},
            "skipped_steps": manifest["skipped_steps"], "step_calls": manifest["step_calls"],
        })
        model.load_state_dict(weights)
        return manifest

    return _collectively(zero_opt, "load_zero_checkpoint", load)
