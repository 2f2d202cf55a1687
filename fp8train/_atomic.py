"""Crash-safe file writes: write to a temporary name in the same directory, fsync, rename.

``os.replace`` is atomic on POSIX, so a reader sees the old file or the new one, never half of one;
the directory is fsync'ed afterwards so that the rename itself survives a power loss.

Directories (checkpoints) are replaced the same way, in three renames that each leave a complete
directory findable: ``replace_dir(new, final)`` moves an existing ``final`` aside to ``.{name}.old``,
renames ``new`` to ``final`` and only then deletes the old one. After a crash ``complete_dir(final)``
names the complete one (``final``, or ``.{name}.old`` while ``final`` is missing) without changing
anything, and ``recover_dir(final)`` puts it back under ``final`` (for the one process that writes).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["atomic_torch_save", "atomic_write", "atomic_write_text", "complete_dir", "fsync_dir", "old_dir",
           "recover_dir", "replace_dir"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and creations inside directory ``path`` durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """``write(file)`` to a temporary file beside ``path``, fsync, then rename onto ``path``; on any
    error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    # not tempfile.mkstemp: its files are mode 0600, and outputs should get the umask's mode
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


# Every rename / removal of a whole directory goes through these two, so that tests can stop a
# replacement between any two of its steps (a crash) by patching them.
def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def old_dir(final: str | os.PathLike) -> Path:
    """Where ``replace_dir`` keeps the previous ``final`` until the new one is in place."""
    final = Path(final)
    return final.with_name(f".{final.name}.old")


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make the complete directory ``new`` become ``final``: ``final`` -> ``.{name}.old``, ``new`` ->
    ``final``, fsync, delete the old. A crash at any point leaves the old or the new directory whole
    under ``final`` or, between the two renames only, the old one under ``.{name}.old``."""
    new, final, old = Path(new), Path(final), old_dir(final)
    if final.exists():
        _remove_tree(old)  # only a crash after a previous swap leaves one beside a complete final
        _rename(final, old)
    _rename(new, final)
    fsync_dir(final.parent)
    _remove_tree(old)


def complete_dir(final: str | os.PathLike) -> Path | None:
    """``final`` if it exists, else its ``.old`` copy if a replacement crashed between its renames,
    else None. Reads only (safe beside a running writer)."""
    final = Path(final)
    if final.is_dir():
        return final
    return old_dir(final) if old_dir(final).is_dir() else None


def recover_dir(final: str | os.PathLike) -> None:
    """Finish a crashed ``replace_dir``: the old copy goes back under ``final`` if ``final`` is missing,
    and is deleted if ``final`` is there (complete: it only ever appears by rename). Only for the
    process that writes ``final``, before it writes."""
    final, old = Path(final), old_dir(final)
    if not old.exists():
        return
    if final.exists():
        _remove_tree(old)
    else:
        _rename(old, final)
        fsync_dir(final.parent)
