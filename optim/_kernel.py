"""The fused CPU step: build the C kernel ``csrc/fp8adamw.c`` (and its headers) once per machine and call it.

Why C and not ``torch.compile``: with AVX2 (this project's CPUs), inductor loads 1-byte elements
through a ``memcpy`` slow path, turns writes into slices of one output into a select chain over the
whole tensor, and evaluates the step's scalar math (``beta ** step``) inside every vector iteration;
the best compiled two-pass step we wrote ran at ~15 ns per element on one thread, ~8x
``torch.optim.AdamW(fused=True)``. The C kernel is small, built in about a second by the system C
compiler (which inductor needs too), cached on disk by a hash of source and flags, and runs on
torch's OpenMP pool (the same libgomp). One call covers every tensor of a bucket: no per-tensor
Python call. Where it cannot be built, the optimizer uses the foreach path (same bits) and warns.

The cache is private to the user ($XDG_CACHE_HOME/fp8train/kernels, 0700): a library is code this
process runs, so only a file we own and nobody else can write is loaded (see ``load_kernel``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.resources
import os
import re
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["KernelArgs", "kernel_cache_dir", "load_kernel"]

_BASE_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-shared", "-fPIC")
# -ffp-contract=off: no FMA contraction, so every operation rounds once, as in the eager path.
# -fno-math-errno / -fno-trapping-math: let sqrtf and the selects vectorise; no result changes.
_AVX2 = ("-mavx2", "-mfma", "-mf16c")
# per torch's CPU capability, the flag sets to try, best first (a compiler without AVX-512 falls back to AVX2)
_ISA_FLAGS = {"AVX2": (_AVX2,), "AVX512": ((*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"), _AVX2)}

_P = ctypes.c_void_p


_INCLUDE = re.compile(r'^#include "(fp8adamw_\w+\.h)"$', re.MULTILINE)


@functools.cache
def _source() -> str:
    """The kernel's C source (package data of fp8train.optim): ``csrc/fp8adamw.c`` with each of its local
    headers inlined at its first ``#include "..."`` (later ones dropped; the headers are guarded anyway),
    one translation unit compiled from one temporary file; the cache key hashes this text, so every
    source file."""
    csrc = importlib.resources.files("fp8train.optim").joinpath("csrc")
    seen: set[str] = set()

    def inline(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in seen:
            return ""
        seen.add(name)
        return _INCLUDE.sub(inline, csrc.joinpath(name).read_text())

    return _INCLUDE.sub(inline, csrc.joinpath("fp8adamw.c").read_text())


class KernelArgs(ctypes.Structure):
    """Mirror of ``fp8adamw_args`` in the C source (field order matters)."""

    _fields_ = [
        ("n_tensors", ctypes.c_int64),
        ("numel", _P), ("grad", _P), ("param", _P), ("exp_avg", _P), ("exp_avg_sq", _P), ("master", _P),
        ("grad_dtype", ctypes.c_int32), ("param_dtype", ctypes.c_int32), ("exp_avg_dtype", ctypes.c_int32),
        ("exp_avg_sq_dtype", ctypes.c_int32), ("master_dtype", ctypes.c_int32), ("n_threads", ctypes.c_int32),
        ("w_amax_needed", ctypes.c_int32),
        ("coef", _P), ("scale_inv", _P), ("new_scale", _P), ("amax", _P),
        ("rounding", ctypes.c_int32), ("sr_key", _P), ("tau", _P), ("stats", _P), ("grad_amax", _P),
        ("grad_sumsq", _P),
    ]


def _compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _current_uid() -> int:
    """The uid that must own the cache (a function, so that tests can pose as another user)."""
    return os.getuid()


def kernel_cache_dir() -> Path:
    """$XDG_CACHE_HOME/fp8train/kernels, or ~/.cache/fp8train/kernels (beside the data cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fp8train" / "kernels"


def _untrusted(path: Path, *, is_dir: bool) -> str | None:
    """Why ``path`` cannot be trusted (not ours, writable by group or others, a link, the wrong
    kind of file), or None. lstat: a symlink is judged as a link, never by its target."""
    st = path.lstat()
    if not (stat.S_ISDIR(st.st_mode) if is_dir else stat.S_ISREG(st.st_mode)):
        return "not a directory" if is_dir else "not a regular file"
    if st.st_uid != _current_uid():
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"mode {stat.S_IMODE(st.st_mode):o}: writable by group or others"
    return None


def _private_cache() -> tuple[Path | None, str]:
    """The per-user cache directory, created 0700, or (None, why) when it is not private."""
    cache = kernel_cache_dir()
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        reason = _untrusted(cache, is_dir=True)
    except OSError as err:
        reason = str(err)
    return (None, f"{cache} is not private ({reason})") if reason else (cache, "")


def _build(cc: str, flags: tuple[str, ...], out: Path) -> None:
    """Compile into ``out``: source and library go to unique temporary names in out's (private)
    directory and the library is renamed into place, so ranks building at once never see half a
    file; the last rename wins, and every one of them is a whole, identical kernel."""
    fd, src = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".c", dir=out.parent)  # mode 0600
    tmp = None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_source())
        fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".so", dir=out.parent)
        os.close(fd)
        subprocess.run([cc, *flags, "-o", tmp, src], check=True, capture_output=True, text=True)
        os.chmod(tmp, 0o700)  # the linker gives the umask's mode (0775 under umask 002)
        os.replace(tmp, out)
    finally:
        for leftover in (src, tmp):
            if leftover is not None:
                Path(leftover).unlink(missing_ok=True)


def _load(cache: Path, cc: str, flags: tuple[str, ...], *, trusted_dir: bool) -> ctypes.CDLL:
    """Load the kernel for ``flags`` from ``cache``, building it first unless a trustworthy copy is
    there (ours, not writable by others); one that is not is rebuilt, never loaded."""
    key = hashlib.sha256("\0".join((_source(), cc, *flags)).encode()).hexdigest()[:20]
    out = cache / f"fp8adamw_{key}.so"
    if not trusted_dir or not out.exists() or _untrusted(out, is_dir=False) is not None:
        _build(cc, flags, out)
    return ctypes.CDLL(str(out))


@functools.cache
def load_kernel(portable: bool = False) -> ctypes.CDLL | None:
    """The compiled kernel, or None (with a warning) when it cannot be built here. ``portable``
    builds it without the AVX2 code (what machines without AVX2 run; used by the tests).
    ``fp8adamw_vector_lanes()`` of the result says which vector loop it has: 16 (AVX-512), 8 (AVX2), 1.

    Cached in ``kernel_cache_dir()`` when that directory is private (0700 on creation, owned by
    this user, not writable by group or others); otherwise the kernel is built into a fresh
    private temporary directory, loaded, and that directory removed (a warning says why)."""
    cc = _compiler()
    if cc is None:
        warnings.warn("fp8train.optim: no C compiler found; Fp8AdamW uses its foreach path on the CPU",
                      RuntimeWarning, stacklevel=2)
        return None
    isas = ((),) if portable else _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ((),))
    attempts = [(*_BASE_FLAGS, *isa, *omp) for isa in isas for omp in (("-fopenmp",), ())]  # OpenMP optional
    cache, why_not = _private_cache()
    if cache is None:
        warnings.warn(f"fp8train.optim: kernel cache {why_not}; building the fused kernel in a fresh private "
                      "directory instead (fix: chmod 700 it if it is yours, or remove it)", RuntimeWarning, stacklevel=2)
    with contextlib.ExitStack() as stack:
        build_dir = cache or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fp8train-kernel-")))
        error = ""
        for flags in attempts:
            try:
                lib = _load(build_dir, cc, flags, trusted_dir=cache is not None)
            except subprocess.CalledProcessError as err:
                error = err.stderr.strip().splitlines()[-1] if err.stderr.strip() else str(err)
                continue
            except OSError as err:
                error = str(err)
                continue
            for name in ("fp8adamw_pass1", "fp8adamw_store", "fp8adamw_grad_amax"):
                getattr(lib, name).argtypes = [ctypes.POINTER(KernelArgs)]
                getattr(lib, name).restype = ctypes.c_int
            lib.fp8adamw_vector_lanes.argtypes, lib.fp8adamw_vector_lanes.restype = [], ctypes.c_int
            return lib  # a loaded library stays mapped when its file is removed
    warnings.warn(f"fp8train.optim: the fused CPU kernel could not be built ({error}); Fp8AdamW uses "
                  "its foreach path on the CPU", RuntimeWarning, stacklevel=2)
    return None
