"""Pretend nodes on one machine for multi-node tests: network namespaces joined by rate-limited links
(the project's launch/netns_cluster.sh), and launch/multi_node.sh run inside them.

Needs root with ``ip`` and ``tc`` (network namespaces, tbf qdisc); ``netns_cluster`` and the ``cluster``
fixture skip with the reason otherwise. Import the fixture into a test module:
``from netns_utils import cluster``."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["LAUNCH", "NETNS_CLUSTER", "NODE_NAMESPACE", "VENV_BIN", "cluster", "free_port", "kill_node",
           "multi_node_cmd", "netns_cluster", "node_addr", "on_node"]

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
NETNS_CLUSTER = LAUNCH / "netns_cluster.sh"
# the script's names (fp8train-hub, fp8train-n<I>) are machine-wide and `up` first removes a cluster
# left over: tests that use it take this lock so that two of them never share (or tear down) one cluster
LOCK = Path("/tmp/fp8train-netns_cluster.lock")
NODE_NAMESPACE = "fp8train-n{}"  # the script's namespace of node i
VENV_BIN = Path(sys.executable).parent


def node_addr(node: int) -> str:
    """The script's address of node ``node``."""
    return f"10.77.0.{node + 1}"


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and tc need root"
    for tool, probe in (("ip", ["ip", "netns", "list"]), ("tc", ["tc", "qdisc", "show", "dev", "lo"])):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2)"
        proc = subprocess.run(probe, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"`{' '.join(probe)}` fails here: {proc.stderr.strip()}"
    return None


def _script(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(NETNS_CLUSTER), *args], capture_output=True, text=True, timeout=timeout_s)


@contextlib.contextmanager
def netns_cluster(nodes: int = 2, rate: str = "1gbit") -> Iterator[None]:
    """``nodes`` nodes at node_addr(0..) with ``rate`` links, under the lock; always torn down, with
    anything left running in them. Skips the test where namespaces cannot be made."""
    if (reason := _unavailable()) is not None:
        pytest.skip(reason)
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            up = _script("up", str(nodes), rate)
            if up.returncode != 0 and "Operation not permitted" in up.stderr:
                pytest.skip(f"cannot create network namespaces here: {up.stderr.strip()}")
            assert up.returncode == 0, up.stderr
            yield
        finally:
            for node in range(nodes):
                kill_node(node)
            _script("down")


@pytest.fixture
def cluster():
    """Two nodes at 10.77.0.1 / .2 with 1 Gbit/s links."""
    with netns_cluster(2, "1gbit"):
        yield


def kill_node(node: int) -> list[int]:
    """SIGKILL every process of node ``node`` (its torchrun agent and workers: a node that dies);
    returns their pids."""
    out = subprocess.run(["ip", "netns", "pids", NODE_NAMESPACE.format(node)], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_node(node: int, *cmd: str) -> list[str]:
    """``cmd`` inside node ``node``: the script exports NODE_ADDR (this node) and MASTER_ADDR (node 0),
    which multi_node.sh uses for --local-addr and the rendezvous endpoint."""
    return [str(NETNS_CLUSTER), "exec", str(node), *cmd]


def multi_node_cmd(node: int, port: int, *overrides: str, run_id: str = "test-multinode",
                   env: tuple[str, ...] = ()) -> list[str]:
    """launch/multi_node.sh on node ``node`` of 2, one process each; ``env``: extra NAME=value for it."""
    # RDZV_IS_HOST: inside a namespace the hostname does not resolve, so torchrun cannot tell by itself
    # that node 0 hosts the c10d store
    return on_node(node, "env", "NNODES=2", "NPROC=1", f"MASTER_PORT={port}", f"RUN_ID={run_id}",
                   f"RDZV_IS_HOST={int(node == 0)}", *env, "bash", str(LAUNCH / "multi_node.sh"), *overrides)
