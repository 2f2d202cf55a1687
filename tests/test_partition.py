"""Whole-tensor ZeRO partition (fp8train.comm.zero.partition): exact invariants on known inputs, balance
on a GPT-shaped model, and the same partition on every rank of a gloo group."""

from __future__ import annotations

import pytest

from fp8train.comm import Partition, partition_parameters
from fp8train.models import GPT, GPTConfig

from dist_utils import run_workers


def test_known_answer_largest_first_ties_to_lowest_rank():
    # order by (numel desc, index): i1 (9), i0 (5), i3 (5), i2 (2), i4 (0)
    # i1 -> r0 (tie 0/0: lowest rank) | i0 -> r1 | i3 -> r1 (5 < 9) | i2 -> r0 (9 < 10) | i4 -> r1 (10 < 11)
    p = partition_parameters([5, 9, 2, 5, 0], 2)
    assert p.owner == (1, 0, 0, 1, 1)
    assert p.loads == (11, 10)
    assert p.balance == pytest.approx(11 / 10.5)


def test_lpt_matches_a_direct_simulation():
    numels = [5, 9, 2, 5, 0, 7, 7, 1]
    for world in (1, 2, 3, 4):
        p = partition_parameters(numels, world)
        loads = [0] * world
        expected = [None] * len(numels)
        for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
            r = min(range(world), key=lambda r: (loads[r], r))
            expected[i] = r
            loads[r] += numels[i]
        assert p.owner == tuple(expected) and p.loads == tuple(loads)
        assert sorted(i for r in range(world) for i in p.owned_by(r)) == list(range(len(numels)))  # owned once


@pytest.mark.parametrize("bad", [dict(numels=[1], world_size=0), dict(numels=[-1], world_size=2)])
def test_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="partition_parameters"):
        partition_parameters(**bad)


@pytest.mark.parametrize("world_size", [2, 4])
def test_balance_on_a_gpt_with_8_layers(world_size):
    model = GPT(GPTConfig(vocab_size=256, block_size=128, n_layer=8, n_head=4, n_embd=256))
    p = partition_parameters([q.numel() for q in model.parameters()], world_size)
    assert p.balance <= 1.05, p.describe()
    assert sum(p.loads) == sum(q.numel() for q in model.parameters())


def _worker_partition(rank, world_size):
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=8, n_head=4, n_embd=64))
    return partition_parameters([q.numel() for q in model.parameters()], world_size)


def test_every_rank_computes_the_same_partition():
    parts = run_workers(_worker_partition, 4)
    assert all(isinstance(p, Partition) and p == parts[0] for p in parts)
