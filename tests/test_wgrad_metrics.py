"""The ``wgrad`` scaling-bias metrics are the scales the FP8 gradient all-reduce used, as
``CommStats.log2_scales`` reported them, keyed by parameter name; not a scale recomputed
from ``.grad`` (under DDP the reduced mean, under ZeRO this rank's local gradient).

2 gloo ranks; rank 0's loss is multiplied by 0, so its local gradients are 0 and the global amax is
rank 1's. The comm's bias is then floor(log2(448 / amax1)), while the mean (amax1 / 2, rounded to
FP8) gives a bias >= 1 higher and rank 0's local zero gradient gives 0: the construction makes the
old recomputation differ from what went on the wire, for DDP and for ZeRO alike. Tier 1 (exact):
biases are integers computed from the same fp32 amax."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_workers
from fp8train.formats import E4M3
from fp8train.linear import Fp8Linear
from fp8train.trainer.fp8_stats import layer_key
from fp8train.trainer.precision import apply_precision
from fp8train.trainer.build import build_model
from fp8train.trainer.config import train_config_from_mapping
from fp8train.trainer.distributed import DistEnv
from fp8train.trainer.fp8_stats_hook import Fp8StatsHook
from fp8train.trainer.strategy import build_strategy

PRESET = {"gemm": "fp8", "grad_comm": "fp8", "optimizer": "fp8_adamw"}


def _cfg(strategy: str):
    return train_config_from_mapping({"model": {"arch": "gpt", "name": "t", "n_layer": 2, "n_embd": 32, "n_head": 2,
                                                "block_size": 16}, "precision": PRESET, "monitor": {"every": 1},
                                      "parallel": {"strategy": strategy}})


def _model(cfg, env):
    model = build_model(cfg.model, seed=0, device=env.device)
    apply_precision(model, cfg.precision, env.device)
    return model


def _loss(module, rank: int) -> torch.Tensor:
    x = torch.randint(256, (4, 16), generator=torch.Generator().manual_seed(100 + rank))
    return module(x, x)[1] * (0.0 if rank == 0 else 1.0)  # rank 0: all-zero local gradients


def _bias(amax: torch.Tensor) -> float:
    """floor(log2(448 / amax)), the comm's rule at margin 0 (0 for amax 0: the kept initial bias)."""
    return float(torch.floor(torch.log2(E4M3.max / amax))) if float(amax) > 0 else 0.0


def _worker(rank: int, world: int, strategy_name: str) -> dict:
    cfg = _cfg(strategy_name)
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world, device=torch.device("cpu"))
    # the oracle: this rank's local (pre-reduce) weight gradients from an identical plain copy
    ref = _model(cfg, env)
    _loss(ref, rank).backward()
    names = [f"{fqn}.weight" for fqn, m in ref.named_modules() if isinstance(m, Fp8Linear)]
    local_amax = torch.stack([dict(ref.named_parameters())[n].grad.abs().max() for n in names])
    amax = local_amax.clone()
    dist.all_reduce(amax, op=dist.ReduceOp.MAX)
    expected = {n: _bias(a) for n, a in zip(names, amax)}

    model = _model(cfg, env)
    strategy = build_strategy(model, cfg, env)
    strategy.set_lr(1e-3)
    hook = Fp8StatsHook(cfg.monitor.every, model, strategy)
    hook.on_step_start(1)  # the loop's order of calls on a sampled step
    with strategy.accumulating(sync=True):
        _loss(strategy.module, rank).backward()
    params = dict(model.named_parameters())
    # what the old metric recomputed: from .grad as it is after backward (DDP: the reduced mean; ZeRO:
    # this rank's local gradient, which ZeRO-2 now frees during the backward when another rank owns it)
    old = {n: _bias(params[n].grad.abs().max()) if strategy_name == "ddp" else _bias(a)
           for n, a in zip(names, local_amax)}
    metrics = hook.after_step(1, strategy.step())
    keys = {n: "fp8/{}/wgrad/scaling_bias/{}".format(*layer_key(n.removesuffix(".weight"))) for n in names}
    return {"expected": expected, "old": old, "logged": {n: metrics.get(k) for n, k in keys.items()},
            "wgrad_keys": sorted(k for k in metrics if "/wgrad/" in k), "keys": sorted(keys.values())}


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_wgrad_bias_is_the_scale_the_all_reduce_used(strategy):
    out = run_workers(_worker, 2, strategy, timeout_s=120)
    rank0 = out[0]  # rank 0 writes the metrics
    assert len(rank0["expected"]) == 2 * 4  # 2 blocks x (qkv, attn_out, ffn_in, ffn_out)
    assert all(v > 0 for v in rank0["expected"].values())
    assert rank0["logged"] == rank0["expected"]
    assert rank0["wgrad_keys"] == rank0["keys"]  # one bias per Fp8Linear weight, nothing recomputed beside it
    for name, bias in rank0["expected"].items():
        assert rank0["old"][name] != bias, f"{name}: the construction must tell the two apart"
    assert out[1]["logged"] == out[1]["expected"]  # the same shared scale on every rank
