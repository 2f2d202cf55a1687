"""The fused CPU step: build the C kernel ``csrc/fp8adamw.c`` once per machine and call it.

Why C and not ``torch.compile``: with AVX2 (this project's CPUs), inductor loads 1-byte elements
through a ``memcpy`` slow path, turns writes into slices of one output into a select chain over the
whole tensor, and evaluates the step's scalar math (``beta ** step``) inside every vector iteration;
the best compiled two-pass step we wrote ran at ~15 ns per element on one thread, ~8x
``torch.optim.AdamW(fused=True)``. The C kernel is small, built in about a second by the system C
compiler (which inductor needs too), cached on disk by a hash of source and flags, and runs on
torch's OpenMP pool (the same libgomp). One call covers every tensor of a bucket: no per-tensor
Python call. Where it cannot be built, the optimizer uses the foreach path (same bits) and warns.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import functools
import getpass
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch


__all__ = ["KernelArgs", "load_kernel"]

_BASE_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-shared", "-fPIC")
# -ffp-contract=off: no FMA contraction, so every operation rounds once, as in the eager path.
# -fno-math-errno / -fno-trapping-math: let sqrtf and the selects vectorise; no result changes.
_ISA_FLAGS = {"AVX2": ("-mavx2", "-mfma", "-mf16c"), "AVX512": ("-mavx2", "-mfma", "-mf16c")}

_P = ctypes.c_void_p


@functools.cache
def _source() -> str:
    """The kernel's C source, shipped as package data of fp8train.optim."""
    return importlib.resources.files("fp8train.optim").joinpath("csrc/fp8adamw.c").read_text()


class KernelArgs(ctypes.Structure):
    """Mirror of ``fp8adamw_args`` in the C source (field order matters)."""

    _fields_ = [
        ("n_tensors", ctypes.c_int64),
        ("numel", _P), ("grad", _P), ("param", _P), ("exp_avg", _P), ("exp_avg_sq", _P), ("master", _P),
        ("grad_dtype", ctypes.c_int32), ("param_dtype", ctypes.c_int32), ("exp_avg_dtype", ctypes.c_int32),
        ("exp_avg_sq_dtype", ctypes.c_int32), ("master_dtype", ctypes.c_int32), ("n_threads", ctypes.c_int32),
        ("w_amax_needed", ctypes.c_int32),
        ("coef", _P), ("scale_inv", _P), ("new_scale", _P), ("amax", _P),
    ]


def _compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str, flags: tuple[str, ...], out: Path) -> None:
    src = out.with_suffix(".c")
    src.write_text(_source())
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.so")  # atomic publish: ranks may build at once
    subprocess.run([cc, *flags, "-o", str(tmp), str(src)], check=True, capture_output=True, text=True)
    os.replace(tmp, out)


@functools.cache
def load_kernel(portable: bool = False) -> ctypes.CDLL | None:
    """The compiled kernel, or None (with a warning) when it cannot be built here. ``portable``
    builds it without the AVX2 code (what machines without AVX2 run; used by the tests)."""
    cc = _compiler()
    if cc is None:
        warnings.warn("fp8train.optim: no C compiler found; Fp8AdamW uses its foreach path on the CPU",
                      RuntimeWarning, stacklevel=2)
        return None
    isa = () if portable else _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ())
    attempts = [(*_BASE_FLAGS, *isa, "-fopenmp"), (*_BASE_FLAGS, *isa)]  # OpenMP optional
    cache = Path(tempfile.gettempdir()) / f"fp8train-kernels-{getpass.getuser()}"
    cache.mkdir(parents=True, exist_ok=True)
    error = ""
    for flags in attempts:
        key = hashlib.sha256("\0".join((_source(), cc, *flags)).encode()).hexdigest()[:20]
        out = cache / f"fp8adamw_{key}.so"
        try:
            if not out.exists():
                _build(cc, flags, out)
            lib = ctypes.CDLL(str(out))
        except subprocess.CalledProcessError as err:
            error = err.stderr.strip().splitlines()[-1] if err.stderr.strip() else str(err)
            continue
        except OSError as err:
            error = str(err)
            continue
        for name in ("fp8adamw_pass1", "fp8adamw_pass2"):
            getattr(lib, name).argtypes = [ctypes.POINTER(KernelArgs)]
            getattr(lib, name).restype = ctypes.c_int
        return lib
    warnings.warn(f"fp8train.optim: the fused CPU kernel could not be built ({error}); Fp8AdamW uses "
                  "its foreach path on the CPU", RuntimeWarning, stacklevel=2)
    return None
