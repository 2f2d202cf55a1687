"""ZeRO's weight all-gather in buckets (``fp8train.comm.zero._weights``): the planner as a pure
function, then on 2 and 4 gloo processes the bucketed gather against the single-bucket one.

Tolerance tier: bit-exact (``torch.equal``) throughout. Buckets change where a parameter's bytes lie
in the gather buffer, never the bytes: a lossless parameter travels as its own bits, an FP8 one is
encoded from its own amax with its own scale, whatever else shares its bucket. So every bucket size
must leave every rank with the very same weights.

The collective is counted through ``WeightGather``'s ``all_gather`` argument (the library's one
seam for it), never by patching ``torch.distributed``."""

from __future__ import annotations

import functools
import random

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fp8train import Fp8Linear, convert_to_fp8
from fp8train.comm import Fp8CommConfig, ZeroConfig, ZeroOptimizer, partition_parameters
from fp8train.comm.zero._weights import WeightGather, plan_weight_buckets, plan_weight_slots, slot_nbytes
from fp8train.models import GPT, GPTConfig
from fp8train.optim import Fp8AdamW

from dist_utils import run_workers


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 16) * 16  # every parameter starts 16-byte aligned in its slot


# ---- the planner (pure) --------------------------------------------------------------------------


@pytest.mark.parametrize("case, nbytes, owner, cap, bucket_of, offsets, slot_bytes", [
    # each rank's parameters, in (owner, index) order, cut into runs of <= 32 bytes; bucket b holds
    # every rank's b-th run
    ("runs_per_rank", [16] * 6, [0, 1, 0, 1, 0, 1], 32, [0, 0, 0, 0, 1, 1], [0, 0, 16, 16, 0, 0], [32, 16]),
    # a parameter over the cap is a run of its own; the next one starts a new run
    ("larger_than_cap", [100, 8, 8], [0, 0, 0], 64, [0, 1, 1], [0, 0, 16], [112, 32]),
    # rank 0 has three runs, rank 1 one: rank 1 owns nothing in buckets 1 and 2
    ("rank_with_fewer_runs", [32, 32, 32, 8], [0, 0, 0, 1], 32, [0, 1, 2, 0], [0, 0, 0, 0], [32, 32, 32]),
    # an empty lossless parameter (0 bytes) fits anywhere; an empty FP8 one still has its scale_inv
    ("empty_parameters", [0, 4, 12], [0, 0, 0], 16, [0, 0, 1], [0, 0, 0], [16, 16]),
    # no cap: one bucket, the single-slot plan
    ("no_cap", [40, 4 + 64], [0, 0], None, [0, 0], [0, 48], [128]),
])
def test_plan_weight_buckets_table(case, nbytes, owner, cap, bucket_of, offsets, slot_bytes):
    order = sorted(range(len(nbytes)), key=lambda i: (owner[i], i))
    plan = plan_weight_buckets(nbytes, owner, order, max(owner) + 1, cap)
    assert (list(plan.bucket_of), list(plan.offsets), list(plan.slot_bytes)) == (bucket_of, offsets, slot_bytes)
    assert [list(m) for m in plan.members] == [[i for i in order if bucket_of[i] == b] for b in range(len(slot_bytes))]


@pytest.mark.parametrize("seed", range(24))
def test_plan_weight_buckets_invariants(seed):
    rng = random.Random(seed)
    world_size, n = rng.randint(1, 5), rng.randint(1, 40)
    nbytes = [rng.choice([0, 4, rng.randint(1, 300), rng.randint(1, 5000)]) for _ in range(n)]
    owner = [rng.randrange(world_size) for _ in range(n)]
    order = sorted(range(n), key=lambda i: (owner[i], i))
    cap = rng.choice([1, 64, 256, 1000, 10**9])
    plan = plan_weight_buckets(nbytes, owner, order, world_size, cap)
    # pure and deterministic: the same inputs (as every rank has them) give the same plan
    assert plan == plan_weight_buckets(list(nbytes), list(owner), list(order), world_size, cap)
    # every parameter in exactly one bucket, each bucket in the planning order
    assert sorted(i for m in plan.members for i in m) == list(range(n))
    for b, members in enumerate(plan.members):
        assert list(members) == [i for i in order if plan.bucket_of[i] == b]
    for r in range(world_size):
        mine = [i for i in order if owner[i] == r]
        buckets = [plan.bucket_of[i] for i in mine]
        # consecutive runs: bucket 0, 1, 2, ... in the planning order, none skipped
        assert all(b - a in (0, 1) for a, b in zip([0] + buckets, buckets))
        runs = [[i for i in mine if plan.bucket_of[i] == b] for b in sorted(set(buckets))]
        for k, run in enumerate(runs):
            pos = 0
            for i in run:  # back to back, 16-aligned
                assert plan.offsets[i] == pos and pos % 16 == 0
                pos += _aligned(nbytes[i])
            # the cap holds, unless one parameter alone exceeds it
            assert pos <= cap or sum(nbytes[i] > 0 for i in run) == 1
            assert pos <= plan.slot_bytes[plan.bucket_of[run[0]]]
            if k + 1 < len(runs):  # greedy: the next run's first parameter did not fit in this one
                assert pos + _aligned(nbytes[runs[k + 1][0]]) > cap
    for b, slot in enumerate(plan.slot_bytes):  # the slot is the largest rank's run, no larger
        assert slot == max(plan.offsets[i] + _aligned(nbytes[i]) for i in plan.members[b])
    uncapped = plan_weight_buckets(nbytes, owner, order, world_size, None)
    assert plan_weight_slots(nbytes, owner, order, world_size) == (list(uncapped.offsets), uncapped.slot_bytes[0])


# ---- distributed workers -------------------------------------------------------------------------

CAPS = [None, 4 * 2**10, 1]  # one bucket (today's gather), several parameters a bucket, one each


def _gpt() -> GPT:
    torch.manual_seed(0)  # the same init on every rank
    return convert_to_fp8(GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64)))


class _Three(nn.Module):
    """Three tensors: on 4 ranks one rank owns nothing at all."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (nn.Parameter(torch.randn(n) * 0.1) for n in (96, 64, 40))


def _fp8_names(model: nn.Module) -> list[str]:
    if isinstance(model, _Three):
        return ["b"]
    return [f"{fqn}.weight" for fqn, m in model.named_modules() if isinstance(m, Fp8Linear)]


def _gather(rank: int, world_size: int, build, cap: int | None) -> dict:
    """One WeightGather.all_gather_ from values that differ on every rank; the counting collective
    keeps references to each bucket's buffers to check that their storage is released anyway."""
    model = build()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    fp8 = [n in _fp8_names(model) for n in names]
    owner = partition_parameters([p.numel() for p in params], world_size).owner
    order = sorted(range(len(params)), key=lambda i: (owner[i], i))
    with torch.no_grad():
        for p in params:
            p.add_(0.125 * (rank + 1))  # afterwards every rank must hold the owner's value
    mine = {names[i]: params[i].detach().clone() for i in range(len(params)) if owner[i] == rank}
    calls: list[dict] = []
    buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def counting_all_gather(output: torch.Tensor, input: torch.Tensor, group) -> None:
        freed = all(t.untyped_storage().nbytes() == 0 for t in buffers[-1]) if buffers else None
        calls.append(dict(output_bytes=output.numel(), input_bytes=input.numel(), previous_freed=freed))
        buffers.append((output, input))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(output, input, group=group)

    weights = WeightGather(params, owner, order, fp8, rank=rank, world_size=world_size, group=None,
                           bucket_bytes=cap, all_gather=counting_all_gather)
    sent = weights.all_gather_()
    last_freed = all(t.untyped_storage().nbytes() == 0 for t in buffers[-1])
    largest = max(_aligned(slot_nbytes(p, f)) for p, f in zip(params, fp8))
    return dict(params={n: p.detach().clone() for n, p in zip(names, params)}, mine=mine, fp8=fp8, names=names,
                owner=owner, calls=calls, last_freed=last_freed, sent=sent, largest=largest,
                slot_bytes=list(weights.plan.slot_bytes), members=[list(m) for m in weights.plan.members])


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(seed))


def _train(rank: int, world_size: int, cap: int, steps: int = 3) -> dict:
    """ZeroOptimizer with comm.bucket_bytes = cap, FP8 Linear weights, the same batches for every cap."""
    model = _gpt()
    zero = ZeroOptimizer(model.named_parameters(), lambda ps: Fp8AdamW(ps, lr=3e-3, weight_decay=0.1),
                         config=ZeroConfig(stage=2, comm=Fp8CommConfig(bucket_bytes=cap)),
                         fp8_weight_names=_fp8_names(model))
    sent = []
    for step in range(steps):
        for p in model.parameters():
            p.grad = None
        tokens = _tokens(1000 * step + rank)
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        result = zero.step()
        assert not result.skipped
        sent.append(result.weight_bytes_sent)
    fp8 = [n in zero.fp8_weight_names for n in zero.names]
    plan = plan_weight_buckets([slot_nbytes(p, f) for p, f in zip(zero.params, fp8)], zero.partition.owner,
                               sorted(range(len(fp8)), key=lambda i: (zero.partition.owner[i], i)), world_size, cap)
    return dict(params={n: p.detach().clone() for n, p in model.named_parameters()}, sent=sent,
                expected_sent=(world_size - 1) * sum(plan.slot_bytes), buckets=len(plan.slot_bytes))


def _worker(rank: int, world_size: int) -> dict:
    out = {"gather": {cap: _gather(rank, world_size, _gpt, cap) for cap in CAPS},
           "three": {cap: _gather(rank, world_size, _Three, cap) for cap in CAPS}}
    if world_size == 2:
        out["train"] = {cap: _train(rank, world_size, cap) for cap in (Fp8CommConfig().bucket_bytes, 4 * 2**10, 1)}
    return out


@functools.cache
def _results(world_size: int) -> tuple[dict, ...]:
    return tuple(run_workers(_worker, world_size, timeout_s=180))


# ---- distributed tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("model", ["gather", "three"])
def test_bucketed_gather_is_bit_identical_to_one_bucket(world_size, model):
    results = [res[model] for res in _results(world_size)]
    one_bucket = results[0][None]
    for cap in CAPS:
        owners = {}
        for res in results:
            owners.update(res[cap]["mine"])
        assert set(owners) == set(one_bucket["names"])
        for r, res in enumerate(results):
            for i, name in enumerate(one_bucket["names"]):
                got = res[cap]["params"][name]
                assert torch.equal(got, one_bucket["params"][name]), f"cap {cap}: rank {r} {name} differs"
                if not one_bucket["fp8"][i]:  # lossless: the owner's bits
                    assert torch.equal(got, owners[name]), f"cap {cap}: rank {r} {name} is not the owner's"
    fp8 = [n for n, f in zip(one_bucket["names"], one_bucket["fp8"]) if f]
    assert fp8 and any(not torch.equal(one_bucket["params"][n], owners[n]) for n in fp8), "FP8 must round"


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("model", ["gather", "three"])
def test_one_all_gather_per_bucket_bounded_and_freed_before_the_next(world_size, model):
    for res in (res[model] for res in _results(world_size)):
        for cap in CAPS:
            run = res[cap]
            slots, calls = run["slot_bytes"], run["calls"]
            assert len(calls) == len(slots), f"cap {cap}"
            for call, slot in zip(calls, slots):
                assert (call["input_bytes"], call["output_bytes"]) == (slot, world_size * slot)
                assert call["output_bytes"] <= world_size * max(cap or 0, run["largest"]) or cap is None
            assert [c["previous_freed"] for c in calls] == [None] + [True] * (len(calls) - 1)
            assert run["last_freed"], "the last bucket's buffers must be released before all_gather_ returns"
            assert run["sent"] == (world_size - 1) * sum(slots)
        assert len(res[None]["slot_bytes"]) == 1
        if model == "gather":
            assert len(res[1]["slot_bytes"]) > len(res[4 * 2**10]["slot_bytes"]) > 1
            # a parameter bigger than the cap: its bucket's buffer is bounded by it, not by the cap
            assert max(res[4 * 2**10]["slot_bytes"]) == res[4 * 2**10]["largest"] > 4 * 2**10


@pytest.mark.parametrize("world_size", [2, 4])
def test_some_bucket_has_a_rank_that_owns_nothing_in_it(world_size):
    for model in ("gather", "three"):
        run = _results(world_size)[0][model][1]
        empty = [(b, r) for b, members in enumerate(run["members"]) for r in range(world_size)
                 if all(run["owner"][i] != r for i in members)]
        assert empty, f"{model}: the bit-identity test must cover a rank without parameters in a bucket"
    if world_size == 4:
        assert set(_results(4)[0]["three"][None]["owner"]) != set(range(4)), "one rank owns nothing at all"


def test_zero_optimizer_buckets_its_weight_gather_by_comm_bucket_bytes():
    results = [res["train"] for res in _results(2)]
    default = Fp8CommConfig().bucket_bytes
    assert results[0][default]["buckets"] == 1 and results[0][1]["buckets"] > results[0][4 * 2**10]["buckets"] > 1
    for res in results:
        for cap, run in res.items():
            assert run["sent"] == [run["expected_sent"]] * 3, f"cap {cap}"
            for name, p in run["params"].items():
                assert torch.equal(p, results[0][default]["params"][name]), f"cap {cap}: {name} differs"
