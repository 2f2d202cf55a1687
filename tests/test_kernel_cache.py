"""Where Fp8AdamW's fused C kernel is built and cached, and what is trusted before ``ctypes`` loads it:
a private per-user cache (0700, owned by us; $XDG_CACHE_HOME/fp8train/kernels), files published by
atomic rename from unique temporary names (ranks building at once), and a cache that is not private
(someone else's, or writable by others) never loaded from or written into."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fp8train.optim._kernel as kernel_mod
from fp8train.optim._kernel import load_kernel

pytestmark = pytest.mark.skipif(kernel_mod._compiler() is None, reason="no C compiler: nothing is built")

# Each process loads the portable kernel (no AVX2 code: any x86 or Arm machine) once, after the
# start time given as argv[1] so that all of them build at the same moment, and reports what it loaded.
_LOAD = """
import json, sys, time, warnings
from fp8train.optim._kernel import load_kernel
while time.time() < float(sys.argv[1]):
    time.sleep(0.001)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lib = load_kernel(portable=True)
print(json.dumps({"path": None if lib is None else lib._name, "warnings": [str(w.message) for w in caught],
                  "pass1": lib is not None and hasattr(lib, "fp8adamw_pass1")}))
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _start_loads(cache_home: Path, n: int, *, delay_s: float) -> list[subprocess.Popen[str]]:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_home), OMP_NUM_THREADS="1")
    start_at = str(time.time() + delay_s)
    return [subprocess.Popen([sys.executable, "-c", _LOAD, start_at], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(n)]


def _reports(procs: list[subprocess.Popen[str]]) -> list[dict]:
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def _load_here(monkeypatch, cache_home: Path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    return load_kernel.__wrapped__(portable=True)  # uncached: this test's environment


def test_kernel_is_cached_in_a_private_per_user_directory(monkeypatch, tmp_path: Path) -> None:
    lib = _load_here(monkeypatch, tmp_path)
    cache = tmp_path / "fp8train" / "kernels"
    so = Path(lib._name)
    assert so.parent == cache
    assert _mode(cache) == 0o700 and cache.stat().st_uid == os.getuid()
    assert so.stat().st_uid == os.getuid() and _mode(so) & 0o022 == 0
    assert sorted(p.name for p in cache.iterdir()) == [so.name]  # no source or temporary file left


def test_concurrent_builds_publish_one_whole_kernel(tmp_path: Path) -> None:
    reports = _reports(_start_loads(tmp_path, 3, delay_s=3.0))
    cache = tmp_path / "fp8train" / "kernels"
    assert all(r["pass1"] and r["warnings"] == [] for r in reports), reports
    assert len({r["path"] for r in reports}) == 1 and Path(reports[0]["path"]).parent == cache
    assert sorted(p.name for p in cache.iterdir()) == [Path(reports[0]["path"]).name]


def _assert_built_elsewhere(lib, cache: Path, caught: list, before: list[str]) -> None:
    assert lib is not None and hasattr(lib, "fp8adamw_pass1")
    assert Path(lib._name).parent != cache
    assert not Path(lib._name).parent.exists()  # the private one-off directory is gone once loaded
    assert sorted(p.name for p in cache.iterdir()) == before  # nothing read from it, nothing written
    assert any(str(cache) in str(w.message) and "not private" in str(w.message) for w in caught), caught


def test_cache_writable_by_others_is_not_used(monkeypatch, tmp_path: Path) -> None:
    cache = tmp_path / "fp8train" / "kernels"
    cache.mkdir(parents=True)
    cache.chmod(0o777)
    with pytest.warns(RuntimeWarning) as caught:
        lib = _load_here(monkeypatch, tmp_path)
    _assert_built_elsewhere(lib, cache, list(caught), [])
    assert _mode(cache) == 0o777  # left as found: not ours to fix


def test_cache_owned_by_someone_else_is_not_used(monkeypatch, tmp_path: Path) -> None:
    cache = tmp_path / "fp8train" / "kernels"
    cache.mkdir(parents=True, mode=0o700)
    (cache / "planted.so").write_bytes(b"not a kernel")
    monkeypatch.setattr(kernel_mod, "_current_uid", lambda: os.getuid() + 1)  # as if another user made it
    with pytest.warns(RuntimeWarning) as caught:
        lib = _load_here(monkeypatch, tmp_path)
    _assert_built_elsewhere(lib, cache, list(caught), ["planted.so"])


def test_cached_kernel_writable_by_others_is_rebuilt_not_loaded(tmp_path: Path) -> None:
    # separate processes: dlopen returns an already-loaded library by path, whatever is on disk now
    (first,) = _reports(_start_loads(tmp_path, 1, delay_s=0.0))
    so = Path(first["path"])
    assert so.parent == tmp_path / "fp8train" / "kernels"  # never tamper with a real cache
    so.write_bytes(b"tampered")
    so.chmod(0o666)
    (second,) = _reports(_start_loads(tmp_path, 1, delay_s=0.0))
    assert second["path"] == first["path"] and second["pass1"] and second["warnings"] == []
    assert _mode(so) & 0o022 == 0 and so.read_bytes()[:4] == b"\x7fELF"
