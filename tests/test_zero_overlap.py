"""ZeRO-2 reduce-scattering during the backward (``ZeroConfig.overlap_grad_reduce``, the default):
inside ``ZeroOptimizer.last_micro_step()`` each gradient bucket goes to its owners as soon as the
backward has accumulated it, and the non-owned gradients are freed then, not in ``step()``.

Every worker trains two copies of the same model on the same batches with gradient accumulation 2:
one reducing in the backward, one with ``overlap_grad_reduce=False`` (the whole reduce-scatter in
``step()``). Tolerance tier: bit-exact (raw bytes) throughout -- owned gradients after each step,
weights, optimizer state, the comm's per-tensor scaling biases. The buckets differ (reverse parameter
order vs owner order) but nothing depends on them: each tensor's scale comes from its own amax,
MAX-reduced over ranks, and the mean is taken element by element in rank order."""

from __future__ import annotations

import functools
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from fp8train.comm import Fp8CommConfig, ZeroConfig, ZeroOptimizer
from fp8train.models import GPT, GPTConfig, Llama, LlamaConfig
from fp8train.optim import Fp8AdamW

from dist_utils import run_workers

ACCUM = 2
SMALL_BUCKET_BYTES = 64 * 2**10  # several buckets for the tiny models' ~0.5 MB of fp32 gradients
MAX_NORM_THAT_CLIPS = 0.05  # the init models' gradient norm is ~1, so every step clips


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)  # the same init on every rank and for both copies
    if kind == "gpt":
        return GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64))
    return Llama(LlamaConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))


def _batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    tokens = torch.randint(0, 256, (4, 33), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _adamw(params: list[nn.Parameter]) -> Fp8AdamW:
    return Fp8AdamW(params, lr=3e-3, weight_decay=0.1)


def _bits(obj) -> list[torch.Tensor]:
    """Every tensor in a nested structure, as raw bytes (any dtype, FP8 included; NaN compares as bits)."""
    if torch.is_tensor(obj):
        return [obj.detach().reshape(-1).clone().view(torch.uint8)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _bits(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _bits(v)]
    return []


def _zero(model: nn.Module, overlap: bool, bucket_bytes: int, max_grad_norm: float | None) -> ZeroOptimizer:
    config = ZeroConfig(stage=2, overlap_grad_reduce=overlap, max_grad_norm=max_grad_norm,
                        comm=Fp8CommConfig(bucket_bytes=bucket_bytes))
    return ZeroOptimizer(model.named_parameters(), _adamw, config=config)


def _train(rank, world_size, kind, steps, bucket_bytes, max_grad_norm, inf_step, overlap):
    model = _model(kind)
    zero = _zero(model, overlap, bucket_bytes, max_grad_norm)
    owned = set(zero.owned_parameter_names)
    out = {"owned_grads": [], "scales": [], "skipped": [], "freed_in_backward": []}
    for step in range(steps):
        for micro in range(ACCUM):
            last = micro == ACCUM - 1
            with zero.last_micro_step() if last else nullcontext():
                _, loss = model(*_batch(rank, step, micro))
                (loss / ACCUM).backward()
            if step == inf_step and micro == 0 and rank == world_size - 1:
                # an inf in the first micro-step's sum: the last backward accumulates onto it
                next(model.parameters()).grad.view(-1)[7] = float("inf")
        out["freed_in_backward"].append(all(p.grad is None for n, p in model.named_parameters() if n not in owned))
        result = zero.step()
        out["skipped"].append(result.skipped)
        out["scales"].append(result.comm.log2_scales_by_name())
        out["owned_grads"].append({n: p.grad.clone() for n, p in model.named_parameters() if n in owned})
        zero.zero_grad()
    out["weights"] = [p.detach().clone() for p in model.parameters()]
    out["state"] = zero.optimizer.state_dict()["state"] if zero.optimizer is not None else {}
    out["skipped_steps"] = zero.skipped_steps
    return out


def _worker(rank, world_size, runs):
    return [{flag: _train(rank, world_size, *run, overlap=flag) for flag in (True, False)} for run in runs]


# (model, steps, bucket_bytes, max_grad_norm, inf_step) per world size; each world size starts its
# processes once (~5 s) and trains every configuration in them
RUNS = {
    2: [("gpt", 4, SMALL_BUCKET_BYTES, None, 2), ("llama", 3, SMALL_BUCKET_BYTES, MAX_NORM_THAT_CLIPS, None),
        ("gpt", 3, 64 * 2**20, None, None)],
    3: [("gpt", 3, SMALL_BUCKET_BYTES, MAX_NORM_THAT_CLIPS, 1)],
}


@functools.cache
def _results(world_size: int) -> list[tuple[dict, ...]]:
    per_rank = run_workers(_worker, world_size, RUNS[world_size], timeout_s=180)
    return [tuple(res[k] for res in per_rank) for k in range(len(RUNS[world_size]))]


@pytest.mark.parametrize("world_size, run", [(2, 0), (2, 1), (2, 2), (3, 0)])
def test_reducing_in_backward_is_bit_identical_to_reducing_in_step(world_size, run):
    kind, steps, _, _, inf_step = RUNS[world_size][run]
    for rank, res in enumerate(_results(world_size)[run]):
        hook, base = res[True], res[False]
        # (an overflowing bucket stops the sending: what is left is freed in step(), which skips)
        assert all(freed for s, freed in enumerate(hook["freed_in_backward"]) if s != inf_step), f"rank {rank}"
        if world_size > 1:  # the reference path frees them only in step(): the check can tell
            assert base["freed_in_backward"] == [False] * steps
        assert hook["skipped"] == base["skipped"] == [s == inf_step for s in range(steps)]
        assert hook["skipped_steps"] == base["skipped_steps"]
        assert hook["scales"] == base["scales"], f"rank {rank}: per-tensor scaling biases differ"
        assert any(hook["scales"]), "some step must have synchronised"
        for step, (g_hook, g_base) in enumerate(zip(hook["owned_grads"], base["owned_grads"])):
            if hook["skipped"][step]:
                continue  # a skipped step's owned gradients are not used (zero_grad follows)
            assert g_hook.keys() == g_base.keys()
            for name in g_hook:
                assert torch.equal(*(_bits([g_hook[name], g_base[name]]))), f"{kind} rank {rank} step {step} {name}"
        for i, (a, b) in enumerate(zip(_bits(hook["weights"]), _bits(base["weights"]))):
            assert torch.equal(a, b), f"{kind} rank {rank}: weight {i} differs"
        state_hook, state_base = _bits(hook["state"]), _bits(base["state"])
        assert len(state_hook) == len(state_base) > 0
        assert all(torch.equal(a, b) for a, b in zip(state_hook, state_base)), f"rank {rank}: optimizer state differs"


# ---- what the rank holds during the backward -------------------------------------------------------


def _held_during_backward(rank, world_size, overlap):
    """Bytes of non-owned gradients alive after each gradient's accumulation (sampled by a hook that
    runs after ZeroOptimizer's own), at the end of the backward, and the plan's largest bucket."""
    model = _model("gpt")
    zero = _zero(model, overlap, SMALL_BUCKET_BYTES, None)
    owned = set(zero.owned_parameter_names)
    others = [p for n, p in model.named_parameters() if n not in owned]
    samples = []

    def sample(_: torch.Tensor) -> None:
        samples.append(sum(p.grad.nbytes for p in others if p.grad is not None))

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(sample)
    with zero.last_micro_step():
        _, loss = model(*_batch(rank, 0, 0))
        loss.backward()
    at_end = sum(p.grad.nbytes for p in others if p.grad is not None)
    zero.step()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return dict(max_held=max(samples), at_end=at_end, all_others=sum(p.nbytes for p in others),
                bound=max(SMALL_BUCKET_BYTES, largest))


def _held_worker(rank, world_size):
    return {flag: _held_during_backward(rank, world_size, flag) for flag in (True, False)}


def test_non_owned_gradients_are_freed_bucket_by_bucket_during_backward():
    for rank, res in enumerate(run_workers(_held_worker, 2, timeout_s=120)):
        hook, base = res[True], res[False]
        assert base["all_others"] > 2 * base["bound"], "the model must span several buckets"
        # reducing in step(): every non-owned gradient is alive at the end of the backward
        assert base["at_end"] == base["max_held"] == base["all_others"]
        # reducing in the backward: at most the one bucket being filled, none at the end
        assert hook["at_end"] == 0, f"rank {rank}"
        assert 0 < hook["max_held"] <= hook["bound"], f"rank {rank}: {hook['max_held']} > {hook['bound']}"


# ---- hook order and missing gradients ---------------------------------------------------------------


class _TwoBranches(nn.Module):
    """Two branches computed in a rank-dependent order, so the backward accumulates their gradients
    in a different order on each rank; ``skip_b`` leaves branch b without a gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor, rank: int, skip_b: bool = False) -> torch.Tensor:
        if rank % 2:
            yb = self.b(x) if not skip_b else torch.ones_like(x)
            ya = self.a(x)
        else:
            ya = self.a(x)
            yb = self.b(x) if not skip_b else torch.ones_like(x)
        return self.head(ya * yb).square().mean()


def _branches(rank, world_size, overlap, skip_b_on_rank):
    model = _TwoBranches()
    order = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, name=name: order.append(name))
    bucket_bytes = 32 * 32 * 4 + 32 * 4  # one Linear(32, 32) per bucket
    zero = _zero(model, overlap, bucket_bytes, None)
    try:
        for step in range(3):
            x = torch.randn(8, 32, generator=torch.Generator().manual_seed(10 * step + rank))
            with zero.last_micro_step():
                model(x, rank, skip_b=rank == skip_b_on_rank).backward()
            zero.step()
            zero.zero_grad()
    except RuntimeError as e:
        return str(e)
    return dict(order=order, weights=[p.detach().clone() for p in model.parameters()])


def _branches_worker(rank, world_size):
    return {"hook": _branches(rank, world_size, True, None), "base": _branches(rank, world_size, False, None),
            "missing": _branches(rank, world_size, True, 1)}


def test_a_different_hook_order_or_a_missing_gradient_neither_hangs_nor_corrupts():
    results = run_workers(_branches_worker, 2, timeout_s=120)
    assert results[0]["hook"]["order"] != results[1]["hook"]["order"], "the ranks must see different hook orders"
    for res in results:
        for a, b in zip(_bits(res["hook"]["weights"]), _bits(res["base"]["weights"])):
            assert torch.equal(a, b)
    # a gradient missing on rank 1 only: every rank raises, none waits in a collective
    assert "parameter 'b.weight' has no gradient" in results[1]["missing"]
    assert "without a gradient on rank(s) [1]" in results[0]["missing"]


# ---- the trainer's strategy ----------------------------------------------------------------------


def _strategy_worker(rank, world_size):
    from trainer_utils import tiny_strategy

    model, strategy = tiny_strategy(rank, world_size, {"gemm": "fp8", "grad_comm": "fp8", "optimizer": "fp8_adamw"},
                                    parallel={"strategy": "zero2"})
    owned = set(strategy.zero.owned_parameter_names)
    held = []
    for micro, last in enumerate((False, True)):
        x = torch.randint(256, (4, 16), generator=torch.Generator().manual_seed(100 * micro + rank))
        with strategy.accumulating(sync=last):
            _, loss = strategy.module(x, x)
            (loss / 2).backward()
        held.append(sorted(n for n, p in model.named_parameters() if p.grad is not None))
    outcome = strategy.step()
    return dict(owned=owned, held=held, names=[n for n, _ in model.named_parameters()], skipped=outcome.skipped)


def test_the_strategy_reduces_during_the_last_micro_steps_backward_only():
    for res in run_workers(_strategy_worker, 2, timeout_s=120):
        assert res["held"][0] == sorted(res["names"]), "an earlier micro-step only accumulates"
        assert res["held"][1] == sorted(res["owned"]), "the last one's backward leaves only owned gradients"
        assert not res["skipped"]


# ---- single process ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, "true", None])
def test_config_rejects_a_non_bool_overlap(value):
    with pytest.raises(ValueError, match="ZeroConfig.overlap_grad_reduce="):
        ZeroConfig(overlap_grad_reduce=value)
