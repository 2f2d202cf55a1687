"""Stochastic-rounding keys by parameter name: with named param groups (``param_names``) a parameter
draws the same random bits in whichever optimizer holds it, so ZeRO (each rank's optimizer holding
its owned parameters) reproduces the replicated run bit for bit under ``rounding="stochastic"``.

Tolerance tier: bit-exact (``torch.equal``). The reference is one process on its own, its gradients
through the FP8 all-reduce on a 1-rank group with the same batch on every rank (the mean of equal
codes is the code itself), as in tests/test_zero_fp8_weights.py."""

from __future__ import annotations

import torch
import torch.distributed as dist

from fp8train import convert_to_fp8
from fp8train.comm import ZeroConfig, ZeroOptimizer, fp8_all_reduce_
from fp8train.models import GPT, GPTConfig
from fp8train.optim import Fp8AdamW

from dist_utils import run_workers


def _model() -> GPT:
    torch.manual_seed(0)
    return convert_to_fp8(GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64)))


def _named_adamw(params: list[torch.nn.Parameter], names: dict[torch.nn.Parameter, str]) -> Fp8AdamW:
    return Fp8AdamW([{"params": params, "param_names": [names[p] for p in params]}], lr=3e-3,
                    rounding="stochastic", seed=7)


def test_a_named_parameter_gets_the_same_key_in_any_optimizer_and_position() -> None:
    a, b, c = (torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3))
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    names = {a: "a", b: "b", c: "c"}
    whole, part = _named_adamw([a, b, c], names), _named_adamw([c, b], names)
    unnamed_whole, unnamed_part = (Fp8AdamW(ps, rounding="stochastic", seed=7) for ps in ([a, b, c], [c, b]))
    for opt in (whole, part, unnamed_whole, unnamed_part):
        opt.step()
    for p in (b, c):
        assert torch.equal(whole.state[p]["rounding_key"], part.state[p]["rounding_key"])
    # by position (no names) c is third in one optimizer, first in the other: another key
    assert not torch.equal(unnamed_whole.state[c]["rounding_key"], unnamed_part.state[c]["rounding_key"])


def _worker(rank: int, world_size: int) -> dict:
    solo = [dist.new_group([r]) for r in range(world_size)][rank]  # every rank creates every group
    zero_model, ref_model = _model(), _model()
    names = {p: n for n, p in zero_model.named_parameters()}
    ref_names = {p: n for n, p in ref_model.named_parameters()}
    zero = ZeroOptimizer(zero_model.named_parameters(), lambda owned: _named_adamw(owned, names),
                         config=ZeroConfig(stage=2))
    ref = _named_adamw(list(ref_model.parameters()), ref_names)
    for step in range(3):
        tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(step))
        for model in (zero_model, ref_model):
            for p in model.parameters():
                p.grad = None
            model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        assert not zero.step().skipped
        stats = fp8_all_reduce_([p.grad for p in ref_model.parameters()], group=solo)
        # the sync's amax bounds, as ZeroOptimizer passes them (stats follow the gradients' order)
        ref.step(found_inf=stats.found_inf, grad_amax=dict(zip(ref_model.parameters(), stats.grad_amax, strict=True)))
    return {"zero": {n: p.detach().clone() for n, p in zero_model.named_parameters()},
            "ref": {n: p.detach().clone() for n, p in ref_model.named_parameters()}}


def test_zero_with_stochastic_rounding_keyed_by_name_is_bit_identical_to_one_process() -> None:
    for rank, out in enumerate(run_workers(_worker, 2)):
        for name, w in out["zero"].items():
            assert torch.equal(w, out["ref"][name]), (rank, name)


def test_named_groups_load_by_name_into_another_grouping() -> None:
    # ZeRO saves each rank's state by parameter name; another world size regroups the parameters,
    # whose param_names then differ from the saved groups': they are members, not hyperparameters
    from fp8train.comm.zero._named_state import load_named_state, named_state

    a, b, c = (torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3))
    names = {a: "a", b: "b", c: "c"}
    first, second = _named_adamw([a, b], names), _named_adamw([c], names)
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    first.step()
    second.step()
    saved = {**named_state(first, {id(p): n for p, n in names.items()})[0],
             **named_state(second, {id(p): n for p, n in names.items()})[0]}
    merged = _named_adamw([c, a], names)
    load_named_state(merged, {id(p): n for p, n in names.items()}, saved, {}, where="test")
    assert merged.param_groups[0]["param_names"] == ["c", "a"]
    for p, source in ((a, first), (c, second)):
        assert torch.equal(merged.state[p]["rounding_key"], source.state[p]["rounding_key"])
        assert torch.equal(merged.state[p]["exp_avg_scaled"].view(torch.uint8),
                           source.state[p]["exp_avg_scaled"].view(torch.uint8))
