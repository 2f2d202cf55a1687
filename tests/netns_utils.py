"""Two "nodes" on one machine for multi-node tests: network namespaces joined by a rate-limited link
(/work/shared/tools/netns-cluster), and launch/multi_node.sh run inside them.

Needs root with ``ip`` and ``tc`` (network namespaces, tbf qdisc); the ``cluster`` fixture skips with
the reason otherwise. Import the fixture into a test module: ``from netns_utils import cluster``."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

__all__ = ["LAUNCH", "NETNS_CLUSTER", "VENV_BIN", "cluster", "free_port", "kill_node", "multi_node_cmd", "on_node"]

NETNS_CLUSTER = Path("/work/shared/tools/netns-cluster")
# netns-cluster's names (fp8n0, fp8n1, fp8br0) are machine-wide and `up` first removes existing ones:
# tests that use it take this lock so that two of them never share (or tear down) one cluster
LOCK = Path("/tmp/fp8train-netns-cluster.lock")
NODE_NETNS = "fp8n{}"  # netns-cluster's namespace of node i
LAUNCH = Path(__file__).resolve().parents[1] / "launch"
VENV_BIN = Path(sys.executable).parent


def _unavailable() -> str | None:
    if not NETNS_CLUSTER.is_file():
        return f"{NETNS_CLUSTER} not found"
    if os.geteuid() != 0:
        return "netns-cluster needs root (network namespaces, tc)"
    for tool, probe in (("ip", ["ip", "netns", "list"]), ("tc", ["tc", "qdisc", "show", "dev", "lo"])):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2)"
        proc = subprocess.run(probe, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"`{' '.join(probe)}` fails here: {proc.stderr.strip()}"
    return None


@pytest.fixture
def cluster():
    """Two nodes at 10.213.0.1 / .2 with 1 Gbit/s links; always torn down, with anything left in them."""
    if (reason := _unavailable()) is not None:
        pytest.skip(reason)
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            up = subprocess.run([str(NETNS_CLUSTER), "up", "2", "1gbit"], capture_output=True, text=True, timeout=60)
            if up.returncode != 0 and "Operation not permitted" in up.stderr:
                pytest.skip(f"cannot create network namespaces here: {up.stderr.strip()}")
            assert up.returncode == 0, up.stderr
            yield
        finally:
            for node in (0, 1):
                kill_node(node)
            subprocess.run([str(NETNS_CLUSTER), "down"], capture_output=True, timeout=60)


def kill_node(node: int) -> list[int]:
    """SIGKILL every process of node ``node`` (its torchrun agent and workers: a node that dies);
    returns their pids."""
    out = subprocess.run(["ip", "netns", "pids", NODE_NETNS.format(node)], capture_output=True, text=True)
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
    """``cmd`` inside node ``node``: netns-cluster exports NODE_ADDR (this node) and MASTER_ADDR (node 0),
    which multi_node.sh uses for --local-addr and the rendezvous endpoint."""
    return [str(NETNS_CLUSTER), "run", str(node), *cmd]


def multi_node_cmd(node: int, port: int, *overrides: str, run_id: str = "test-multinode",
                   env: tuple[str, ...] = ()) -> list[str]:
    """launch/multi_node.sh on node ``node`` of 2, one process each; ``env``: extra NAME=value for it."""
    # RDZV_IS_HOST: inside a namespace the hostname does not resolve, so torchrun cannot tell by itself
    # that node 0 hosts the c10d store
    return on_node(node, "env", "NNODES=2", "NPROC=1", f"MASTER_PORT={port}", f"RUN_ID={run_id}",
                   f"RDZV_IS_HOST={int(node == 0)}", *env, "bash", str(LAUNCH / "multi_node.sh"), *overrides)
