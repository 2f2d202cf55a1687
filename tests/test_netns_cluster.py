"""The project's pretend cluster (launch/netns_cluster.sh via tests/netns_utils.py): the multi-node tests
and the comm benchmark need nothing outside the repository; nodes reach each other at their addresses
over links shaped to the given rate; `down` removes what `up` made and nothing else.

The namespace tests need root with ``ip`` and ``tc`` and are skipped with the reason otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from netns_utils import NETNS_CLUSTER, free_port, netns_cluster, node_addr, on_node

REPO = Path(__file__).resolve().parents[1]
# where the multi-node machinery is used or documented: none of it may point outside the repository
USERS = [*sorted(set((REPO / "tests").glob("*.py")) - {Path(__file__).resolve()}), *sorted((REPO / "bench").glob("*.py")),
         *sorted((REPO / "launch").iterdir()), REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

RATE_MBIT = 32
PAYLOAD_BYTES = 4 << 20
TBF_BURST_BYTES = 512 << 10  # launch/netns_cluster.sh BURST: sent at once, before the rate applies

# node 0 receives until EOF and answers one byte; node 1 times connect .. answer
SERVER = """
import socket, sys
with socket.create_server((sys.argv[1], int(sys.argv[2]))) as srv:
    print("listening", flush=True)
    conn, _ = srv.accept()
    with conn:
        n = 0
        while chunk := conn.recv(1 << 16):
            n += len(chunk)
        conn.sendall(b"k")
    print(n, flush=True)
"""
CLIENT = """
import socket, sys, time
t0 = time.perf_counter()
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as conn:
    conn.sendall(bytes(int(sys.argv[3])))
    conn.shutdown(socket.SHUT_WR)
    assert conn.recv(1) == b"k"
print(time.perf_counter() - t0)
"""


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _links() -> str:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return "\n".join(sorted(line.split(":")[1].strip() for line in out.splitlines()))


def test_the_cluster_tool_is_the_projects_own():
    assert NETNS_CLUSTER.resolve().is_relative_to(REPO), NETNS_CLUSTER
    assert NETNS_CLUSTER.is_file()
    outside = [f"{path.relative_to(REPO)}: {marker}" for path in USERS if path.is_file()
               for marker in ("/work/shared", "../shared/", "netns-cluster") if marker in path.read_text()]
    assert not outside, outside


def test_nodes_talk_over_links_shaped_to_the_rate():
    with netns_cluster(2, f"{RATE_MBIT}mbit"):
        env = subprocess.run(on_node(1, "sh", "-c", "echo $NODE_ADDR $MASTER_ADDR $GLOO_SOCKET_IFNAME"),
                             capture_output=True, text=True, check=True).stdout.split()
        assert env == [node_addr(1), node_addr(0), "eth0"]
        port = free_port()
        server = subprocess.Popen(on_node(0, sys.executable, "-c", SERVER, node_addr(0), str(port)),
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "listening"
            client = subprocess.run(on_node(1, sys.executable, "-c", CLIENT, node_addr(0), str(port),
                                            str(PAYLOAD_BYTES)), capture_output=True, text=True, timeout=60)
            assert client.returncode == 0, client.stderr
            received, _ = server.communicate(timeout=30)
        finally:
            server.kill()
            server.wait()
        assert int(received) == PAYLOAD_BYTES
        seconds = float(client.stdout)
        # the bytes beyond the token bucket's burst go at the rate; loopback without shaping takes ~10 ms.
        # 0.8: tbf counts L2 frames, so the payload alone arrives slightly faster than RATE
        floor_s = 0.8 * (PAYLOAD_BYTES - TBF_BURST_BYTES) * 8 / (RATE_MBIT * 1e6)
        assert floor_s < seconds < 4 * PAYLOAD_BYTES * 8 / (RATE_MBIT * 1e6), seconds


def test_down_removes_the_cluster_and_touches_nothing_else():
    bystander = "fp8trainbystander"  # shares the prefix's letters, not the prefix
    with netns_cluster(1, "none"):  # skips here without root
        before_ns, before_links = _namespaces(), _links()
        subprocess.run(["ip", "netns", "add", bystander], check=True)
        try:
            subprocess.run([str(NETNS_CLUSTER), "up", "3", "1gbit"], capture_output=True, check=True, timeout=60)
            assert {f"fp8train-n{i}" for i in range(3)} | {"fp8train-hub"} <= _namespaces()
            assert _links() == before_links  # every link lives inside the cluster's namespaces
            subprocess.run([str(NETNS_CLUSTER), "down"], capture_output=True, check=True, timeout=60)
            assert _namespaces() == (before_ns - {"fp8train-n0", "fp8train-hub"}) | {bystander}
        finally:
            subprocess.run(["ip", "netns", "del", bystander], capture_output=True)
