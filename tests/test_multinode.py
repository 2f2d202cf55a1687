"""Two nodes for real: launch/multi_node.sh on two network namespaces joined by a rate-limited link
(launch/netns_cluster.sh), one process each, c10d rendezvous on node 0. The same config run
as 2 processes on one node (launch/single_node.sh) must give bit-identical metrics and weights: the
math does not depend on where the ranks live (tolerance tier 1, bit-exact). With ddp, and with fsdp2
(its FP8 reduce-scatter and weight all-gather crossing the link; with fp8_o2, and with fp8_o3, whose FP8
primary weights' 1-byte shards FSDP2 gathers; a reliability test, ~30 s each).

Needs root with ``ip`` and ``tc`` (network namespaces, tbf qdisc); skipped with the reason otherwise."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch

from netns_utils import LAUNCH, VENV_BIN, cluster, free_port, multi_node_cmd, on_node  # noqa: F401  (fixture)
from trainer_utils import cli_env, metrics_without_timing

STEPS = 20
# launcher.cpu_threads=1: each rank would get cores / processes-on-its-node torch threads, 2 in the 2x1
# layout and 1 in the 1x2 one. Two ranks with 2 threads each on this 2-core machine oversubscribe it
# (measured: 72 s instead of 26 s for the 2-node run), and the thread count may change how CPU kernels
# split their sums; the results did match with 2 threads here, but bit-exactness should not rest on it.
CONFIG = ("experiment=smoke", "logging.progress=false", "logging.log_every=1", "launcher.cpu_threads=1")


def tx_bytes(node: int, env: dict[str, str]) -> int:
    out = subprocess.run(on_node(node, "cat", "/sys/class/net/eth0/statistics/tx_bytes"), env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.slow
@pytest.mark.reliability  # ~30 s per strategy (make test-reliability; CI runs it)
@pytest.mark.parametrize("parallel, precision", [("ddp", "fp8_o2"), ("fsdp2", "fp8_o2"), ("fsdp2", "fp8_o3")])
def test_two_nodes_match_two_processes_on_one_node_bit_for_bit(cluster, tmp_path, parallel, precision):
    env = cli_env(tmp_path / "cache")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    multi, single = tmp_path / "multi", tmp_path / "single"  # one filesystem: both namespaces see tmp_path
    config = (*CONFIG, f"parallel={parallel}", f"precision={precision}")
    overrides = (*config, f"hydra.run.dir={multi}")
    port = free_port()
    node1 = subprocess.Popen(multi_node_cmd(1, port, *overrides), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        node0 = subprocess.run(multi_node_cmd(0, port, *overrides), cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=180)
        node1_out, _ = node1.communicate(timeout=60)
    finally:
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
            node1.wait()
    assert node0.returncode == 0, (node0.stdout + node0.stderr)[-3000:]
    assert node1.returncode == 0, node1_out[-3000:]
    assert "on 2 x cpu" in node0.stdout  # one job of two ranks, not two single-process runs
    comm = [r["train/comm_bytes"] for r in metrics_without_timing(multi) if "train/comm_bytes" in r]
    assert tx_bytes(1, env) > STEPS * comm[-1] // 2  # the gradients crossed node 1's link

    proc = subprocess.run(["bash", str(LAUNCH / "single_node.sh"), *config, f"hydra.run.dir={single}"],
                          cwd=tmp_path, env=dict(env, NPROC="2"), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    a, b = metrics_without_timing(multi), metrics_without_timing(single)
    assert len(a) == len(b) > STEPS  # every step's loss, lr, grad norm, comm bytes, scaling biases; val losses
    assert a == b
    if parallel == "fsdp2":  # sharded DCP files: the identical metrics above cover the weights' path
        return
    final = f"checkpoints/step_{STEPS:08d}/model.pt"
    weights_multi = torch.load(multi / final, weights_only=True)
    weights_single = torch.load(single / final, weights_only=True)
    assert weights_multi.keys() == weights_single.keys()
    assert all(torch.equal(weights_multi[k], weights_single[k]) for k in weights_multi)
