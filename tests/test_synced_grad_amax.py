"""``CommStats.grad_amax``: upper bounds of max |g| after an FP8 gradient sync, known from the shared scales
alone (comm/allreduce.py, ``synced_grad_amax``), and the trainer's strategies handing them to
``Fp8AdamW.step(grad_amax=)`` so that its step reads each gradient once (or, where the trainer
clips, ``Fp8AdamW.clip_grad_norm_``'s exact amaxes from the clip's own read).

A bound must never be below the synchronised gradient's true amax (the optimizer's scales would then
let a stored state overflow), and must stay within two FP8 roundings of the largest |g| any rank sent
(else the scales it gives are needlessly coarse)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_workers
from trainer_utils import tiny_strategy

# per rank: (dtype, values) of each gradient; magnitudes differ between ranks and tensors
_SHAPES = [(64, 48), (1000,), (7, 3), (5,)]


def _grads(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + rank)
    grads = [torch.randn(s, generator=gen) * 10.0 ** (rank - i) for i, s in enumerate(_SHAPES)]
    grads[1][17] = 3.0e4 * (rank + 1)  # a spike, on every rank, of different size
    grads[2] = grads[2].to(torch.bfloat16)
    grads[2][0, 0] = 3.0e38  # 448 * 2**-s >= it only past bf16's max (3.39e38): the cap applies
    grads[3].zero_()  # all zero: the scale of a zero amax is kept
    return grads


def _bound_worker(rank: int, world: int, fmt: str, margin: int) -> dict:
    from fp8train.comm import Fp8CommConfig, fp8_all_reduce_, fp8_reduce_scatter
    from fp8train.comm._layout import FlatLayout, uniform_bounds

    config = Fp8CommConfig(format=fmt, margin=margin, bucket_bytes=4096)  # several buckets
    grads = _grads(rank)
    sent = torch.stack([g.abs().max().float() for g in grads])
    dist.all_reduce(sent, op=dist.ReduceOp.MAX)
    reduced = [g.clone() for g in grads]
    stats = fp8_all_reduce_(reduced, config=config)
    out = {"sent": sent, "all_reduce_bound": stats.grad_amax,
           "all_reduce_amax": torch.stack([g.abs().max().float() for g in reduced]), "rs": []}
    layout = FlatLayout.of(grads)
    for requantize in (False, True):
        chunk, rs_stats = fp8_reduce_scatter(grads, uniform_bounds(layout.numel, world), config=config,
                                             requantize=requantize)
        lo = uniform_bounds(layout.numel, world)[rank]
        for i, start, stop in layout.segments(lo, lo + chunk.numel()):
            out["rs"].append((float(chunk[start - lo:stop - lo].abs().max()), float(rs_stats.grad_amax[i])))
    return out


@pytest.mark.parametrize("fmt,margin", [("e4m3", 0), ("e5m2", 0), ("e4m3", 2)])
def test_synced_grad_amax_bounds_the_synchronised_gradients(fmt, margin):
    for res in run_workers(_bound_worker, 2, fmt, margin, timeout_s=120):
        bound, amax, sent = res["all_reduce_bound"], res["all_reduce_amax"], res["sent"]
        assert bound.dtype == torch.float32 and bound.shape == (len(_SHAPES),)
        assert bool((amax <= bound).all()), (amax, bound)
        rounding = (1 + 2.0 ** -({"e4m3": 3, "e5m2": 2}[fmt] + 1)) ** 2  # two roundings (quantize, requantize)
        for j in range(2):  # the nonzero ones below the cap: within two roundings of what was sent
            assert float(bound[j]) <= rounding * float(sent[j]) * (1 + 2.0**-12), (j, bound, sent)  # + 3 d: tiny
        assert float(bound[2]) == torch.finfo(torch.bfloat16).max  # capped at the gradient dtype's max
        assert float(amax[3]) == 0.0 and float(bound[3]) >= 0.0
        assert res["rs"], "the reduce-scatter chunk covers some tensor"
        for chunk_amax, chunk_bound in res["rs"]:
            assert chunk_amax <= chunk_bound


def _strategy_worker(rank: int, world: int, preset: dict, parallel: dict,
                     max_grad_norm: float | None) -> list[tuple[str, float, float]]:
    """(where the step's max |g| came from, true max |g| of the gradient the step applies, the max |g| the
    step is given) for every parameter the local optimizer steps: "clip" (Fp8AdamW.clip_grad_norm_'s
    exact amax of the clipped gradient) or "sync" (the FP8 sync's bound, passed as ``grad_amax``)."""
    model, strategy = tiny_strategy(rank, world, preset, parallel=parallel, optim={"max_grad_norm": max_grad_norm})
    optimizer = strategy.local_optimizer
    seen: list[tuple[str, float, float]] = []
    original = optimizer.step

    def recording_step(*args, grad_amax=None, **kwargs):
        stepped = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        pending = optimizer._pending_clip
        if pending is not None:  # applied by this step: the gradient it sees is fl(g * coef)
            assert set(pending.grad_amax) == set(stepped), "an amax for every stepped parameter"
            seen.extend(("clip", float((p.grad.float() * pending.coef).abs().max()), float(pending.grad_amax[p]))
                        for p in stepped)
        else:
            assert grad_amax is not None and set(grad_amax) == set(stepped), "a bound for every stepped parameter"
            seen.extend(("sync", float(p.grad.abs().max()), float(grad_amax[p])) for p in stepped)
        return original(*args, grad_amax=grad_amax, **kwargs)

    optimizer.step = recording_step  # this instance only: records what the strategy hands over
    for step in range(2):
        x = torch.randint(256, (4, 16), generator=torch.Generator().manual_seed(100 * step + rank))
        with strategy.accumulating(sync=True):
            _, loss = strategy.module(x, x)
            loss.backward()
        assert not strategy.step().skipped
        strategy.zero_grad()
    return seen


@pytest.mark.parametrize("parallel,max_grad_norm,source", [
    ({"strategy": "ddp"}, 0.01, "clip"),   # the clip's coefficient < 1 folded into the step
    ({"strategy": "ddp"}, None, "clip"),   # the norm is measured anyway (for the log): its amax comes along
    ({"strategy": "zero2"}, 0.01, "clip"),
    ({"strategy": "zero2"}, None, "sync"),  # nothing reads the gradients before the step: the sync's bounds
], ids=["ddp-clip", "ddp-noclip", "zero2-clip", "zero2-noclip"])
def test_strategies_hand_fp8_adamw_the_amax_of_every_gradient(parallel, max_grad_norm, source):
    preset = {"gemm": "fp8", "grad_comm": "fp8", "optimizer": "fp8_adamw"}
    out = run_workers(_strategy_worker, 2, preset, parallel, max_grad_norm, timeout_s=120)
    rows = [row for res in out for row in res]
    assert rows and {where for where, _, _ in rows} == {source}
    for _, true_amax, given in rows:
        if source == "clip":  # exact: fl(max|g| * c) is max |fl(g * c)|, rounding being monotone
            assert given == true_amax, (true_amax, given)
        else:
            assert true_amax <= given < float("inf"), (true_amax, given)
