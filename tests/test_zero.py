"""Whole-tensor ZeRO-1/2 (fp8train.comm.zero) against the replicated FP8 path, on 2 and 4 gloo
processes. Every worker trains two copies of the same GPT on the same batches: one through
``ZeroOptimizer``, one replicated (``fp8_all_reduce_`` of every gradient, then ``Fp8AdamW`` over all
parameters, skipping on ``found_inf``). Tolerance tier: bit-exact (``torch.equal``) throughout — the
owners receive bit for bit the replicated gradients (requantized reduce-scatter), the inner
optimizer's math is per tensor, weights travel as raw bytes, and the clipping norm is summed from the
same per-parameter fp32 sums of squares in the same order; no step of the sharded path rounds
differently from the replicated one."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from fp8train.comm import Fp8CommConfig, ZeroConfig, ZeroOptimizer, fp8_all_reduce_
from fp8train.models import GPT, GPTConfig
from fp8train.optim import Fp8AdamW

from conftest import hp_tol
from dist_utils import run_workers

# ---- single process ------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("stage", 0), ("stage", 3), ("stage", "2"), ("stage", True), ("comm", {"format": "e4m3"}),
    ("max_grad_norm", 0.0), ("max_grad_norm", -1.0), ("max_grad_norm", float("nan")),
    ("max_grad_norm", float("inf")), ("max_grad_norm", "1.0"), ("max_grad_norm", True),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"ZeroConfig.{field}="):
        ZeroConfig(**{field: value})


def test_config_accepts_the_documented_values():
    assert ZeroConfig().stage == 2 and ZeroConfig().max_grad_norm is None
    ZeroConfig(stage=1, comm=Fp8CommConfig(format="e5m2"), max_grad_norm=1)
    ZeroConfig(stage=2, max_grad_norm=0.5)


# ---- distributed ---------------------------------------------------------------------------------

MAX_NORM_THAT_CLIPS = 0.05  # the init GPT's gradient norm is ~1, so every step clips
SMALL_BUCKET_BYTES = 64 * 2**10  # splits the GPT's 475 kB of fp32 gradients into several buckets


def _model() -> GPT:
    torch.manual_seed(0)  # the same init on every rank and for both copies
    return GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, 256, (4, 33), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _adamw(params: list[torch.nn.Parameter]) -> Fp8AdamW:
    return Fp8AdamW(params, lr=3e-3, weight_decay=0.1)


def _backward(model: GPT, x: torch.Tensor, y: torch.Tensor, poison: bool) -> None:
    for p in model.parameters():
        p.grad = None
    _, loss = model(x, y)
    loss.backward()
    if poison:
        model.h[1].mlp.c_fc.weight.grad[3, 5] = float("inf")


def _torch_adamw(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)


def _reference_clip_(grads: list[torch.Tensor], max_norm: float, ref: torch.optim.Optimizer) -> torch.Tensor:
    """What ZeroOptimizer's clip computes, on the replicated gradients: Fp8AdamW's own clip (per-parameter
    float64 sums of squares from its kernel, the coefficient folded into its next step); any other
    optimizer: per-parameter fp32 sums of squares summed in float64 in parameter order, clip_grad_norm_'s
    formula, gradients scaled."""
    if isinstance(ref, Fp8AdamW):
        return ref.clip_grad_norm_(max_norm)
    norm = torch.stack([g.to(torch.float32).square().sum() for g in grads]).double().sum().sqrt().float()
    torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


def _count_collectives() -> dict[str, int]:
    """Wrap this worker's dist.all_gather_single/all_gather_into_tensor and dist.all_reduce to count
    calls (test-side only: the library looks them up at call time)."""
    calls = {"all_gather": 0, "all_reduce": 0}
    gather_name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    setattr(dist, gather_name, counted("all_gather", getattr(dist, gather_name)))
    dist.all_reduce = counted("all_reduce", dist.all_reduce)
    return calls


def _train(rank, world_size, calls, stage, steps, inf_step, max_grad_norm, bucket_bytes=64 * 2**20, optimizer="fp8"):
    zero_model, ref_model = _model(), _model()
    factory = _adamw if optimizer == "fp8" else _torch_adamw
    zero = ZeroOptimizer(zero_model.named_parameters(), factory,
                         config=ZeroConfig(stage=stage, max_grad_norm=max_grad_norm,
                                           comm=Fp8CommConfig(bucket_bytes=bucket_bytes)))
    ref = factory(list(ref_model.parameters()))
    norms, skipped_flags, calls_per_step = [], [], []
    for step in range(steps):
        x, y = _batch(rank, step)
        poison = step == inf_step and rank == world_size - 1
        _backward(zero_model, x, y, poison)
        _backward(ref_model, x, y, poison)
        before = dict(calls)
        result = zero.step()
        calls_per_step.append({k: calls[k] - before[k] for k in calls})
        skipped_flags.append(result.skipped)
        grads = [p.grad for p in ref_model.parameters()]
        stats = fp8_all_reduce_(grads)
        if max_grad_norm is not None and not stats.found_inf:
            # torch's own norm (per-tensor norms first), for a sanity check of the formula
            torch_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            norms.append((result.grad_norm, _reference_clip_(grads, max_grad_norm, ref), torch_norm))
        if isinstance(ref, Fp8AdamW):  # the sync's amax bounds, as ZeroOptimizer passes them (stats follow the
            # gradients' order); a clip's exact amaxes take precedence
            ref.step(found_inf=stats.found_inf, grad_amax=dict(zip(ref_model.parameters(), stats.grad_amax, strict=True)))
        elif not stats.found_inf:
            ref.step()
        if stage == 2:
            owned = set(zero.owned_parameter_names)
            assert all((p.grad is None) == (n not in owned) for n, p in zero_model.named_parameters()), \
                "stage 2 frees exactly the non-owned gradients"
        zero.zero_grad()
    return dict(
        zero_params=[p.detach().clone() for p in zero_model.parameters()],
        ref_params=[p.detach().clone() for p in ref_model.parameters()],
        init_params=[p.detach().clone() for p in _model().parameters()],
        skipped=zero.skipped_steps, ref_skipped=getattr(ref, "skipped_steps", None), skipped_flags=skipped_flags,
        state_nbytes=zero.state_nbytes(), predicted=zero.predicted_state_nbytes(),
        ref_state_nbytes=ref.state_nbytes() if isinstance(ref, Fp8AdamW) else None, owned=zero.owned_parameter_names,
        norms=norms, calls_per_step=calls_per_step, owner=zero.partition.owner,
    )


def _worker_runs(rank, world_size, runs):
    calls = _count_collectives()
    return [_train(rank, world_size, calls, *run) for run in runs]


# (stage, steps, inf_step, max_grad_norm[, bucket_bytes, optimizer]) per world size. Starting the processes (~5 s) and the first
# step (~3 s of kernel warm-up) dominate a run's time, so each world size starts its processes once
# and trains every configuration in them, one after another, each from a fresh model.
RUNS = {
    2: [(1, 20, None, None), (2, 20, None, None), (1, 6, 2, None), (2, 6, 2, None),
        (1, 8, None, MAX_NORM_THAT_CLIPS), (2, 8, None, MAX_NORM_THAT_CLIPS), (2, 6, 2, None, SMALL_BUCKET_BYTES),
        (2, 8, None, MAX_NORM_THAT_CLIPS, 64 * 2**20, "torch")],
    4: [(1, 8, None, None), (2, 8, None, None), (2, 6, 2, None)],
}


@functools.cache
def _results(world_size: int) -> dict[tuple, tuple[dict, ...]]:
    """{run: per-rank results}; each world size runs once per session, several tests read it."""
    per_rank = run_workers(_worker_runs, world_size, RUNS[world_size], timeout_s=120)
    return {run: tuple(res[k] for res in per_rank) for k, run in enumerate(RUNS[world_size])}


def _assert_matches_replicated_and_identical_across_ranks(results: tuple[dict, ...]) -> None:
    for r, res in enumerate(results):
        for i, (z, ref) in enumerate(zip(res["zero_params"], res["ref_params"])):
            assert torch.equal(z, ref), f"rank {r} parameter {i} differs from the replicated path"
        assert not all(torch.equal(z, p0) for z, p0 in zip(res["zero_params"], res["init_params"])), "no step taken"
    for res in results[1:]:
        for i, (a, b) in enumerate(zip(res["zero_params"], results[0]["zero_params"])):
            assert torch.equal(a, b), f"parameter {i} differs across ranks"


@pytest.mark.parametrize("world_size, stage, steps", [(2, 1, 20), (2, 2, 20), (4, 1, 8), (4, 2, 8)])
def test_zero_is_bit_exact_to_the_replicated_fp8_path(world_size, stage, steps):
    results = _results(world_size)[(stage, steps, None, None)]
    _assert_matches_replicated_and_identical_across_ranks(results)
    owned = [set(res["owned"]) for res in results]
    assert set().union(*owned) == {n for n, _ in _model().named_parameters()}
    assert sum(len(o) for o in owned) == len(results[0]["owner"]), "each parameter has exactly one owner"
    for res in results:  # one (default 64 MB) gradient bucket: ONE amax sync, ONE weight all-gather (the
        # FP8 chunks move by p2p on gloo, not counted here)
        assert all(c == {"all_gather": 1, "all_reduce": 1} for c in res["calls_per_step"])


@pytest.mark.parametrize("world_size, stage", [(2, 1), (2, 2), (4, 2)])
def test_inf_on_one_rank_skips_the_step_on_every_rank(world_size, stage):
    inf_step = 2  # the last rank's gradient gets one inf element at this step
    results = _results(world_size)[(stage, 6, inf_step, None)]
    for res in results:
        assert res["skipped"] == 1 and res["ref_skipped"] == 1
        assert res["skipped_flags"] == [step == inf_step for step in range(6)]
        assert res["calls_per_step"][inf_step]["all_gather"] == 0, "a skipped step sends no weights"
    _assert_matches_replicated_and_identical_across_ranks(results)


@pytest.mark.parametrize("world_size, stage, steps", [(2, 1, 20), (2, 2, 20), (4, 2, 8)])
def test_state_bytes_match_the_partition_prediction(world_size, stage, steps):
    results = _results(world_size)[(stage, steps, None, None)]
    predicted = results[0]["predicted"]
    assert [res["state_nbytes"] for res in results] == predicted
    # sharding moves state, it does not add any: the ranks together hold the replicated optimizer's
    assert sum(predicted) == results[0]["ref_state_nbytes"]
    # sharded: LPT's bound, max load <= mean load + largest tensor (whole tensors cannot be split)
    numels = [p.numel() for p in _model().parameters()]
    assert max(predicted) <= 5 * (sum(numels) / world_size + max(numels)) + 16 * len(numels)


@pytest.mark.parametrize("run", [(1, 8, None, MAX_NORM_THAT_CLIPS), (2, 8, None, MAX_NORM_THAT_CLIPS),
                                 (2, 8, None, MAX_NORM_THAT_CLIPS, 64 * 2**20, "torch")],
                         ids=["stage1", "stage2", "stage2-torch-adamw"])
def test_clipping_matches_the_replicated_path_bit_for_bit(run):
    results = _results(2)[run]
    _assert_matches_replicated_and_identical_across_ranks(results)
    for res in results:
        assert len(res["norms"]) == 8
        for zero_norm, ref_norm, torch_norm in res["norms"]:
            # bit-exact: the same per-parameter sums of squares, summed in the same order
            assert torch.equal(zero_norm, ref_norm)
            assert zero_norm > MAX_NORM_THAT_CLIPS, "the test must exercise clipping"
            # torch's clip_grad_norm_ takes per-tensor norms first: another fp32 rounding order
            torch.testing.assert_close(zero_norm, torch_norm, **hp_tol(torch.float32))
        # the norm: ONE all_reduce beside the amax sync
        assert all(c == {"all_gather": 1, "all_reduce": 2} for c in res["calls_per_step"])


def test_stage2_with_several_gradient_buckets_matches_and_stops_at_the_inf_bucket():
    inf_step = 2
    results = _results(2)[(2, 6, inf_step, None, SMALL_BUCKET_BYTES)]
    _assert_matches_replicated_and_identical_across_ranks(results)
    for res in results:
        amax_syncs = [c["all_reduce"] for c in res["calls_per_step"]]
        n_buckets = amax_syncs[0]
        assert n_buckets >= 3, "the bucket size must split the gradients"
        assert amax_syncs[:inf_step] + amax_syncs[inf_step + 1:] == [n_buckets] * 5
        # the inf lies in one bucket: every rank stops after that bucket's amax sync, the same one
        assert 1 <= amax_syncs[inf_step] <= n_buckets and res["skipped"] == 1
        # the weights go in buckets of the same bucket_bytes (per rank): several all-gathers a step
        gathers = [c["all_gather"] for c in res["calls_per_step"]]
        assert gathers[0] > 1 and gathers == [gathers[0]] * inf_step + [0] + [gathers[0]] * 3
    assert len({res["calls_per_step"][inf_step]["all_reduce"] for res in results}) == 1
