"""FP8 collectives on FSDP2 (comm/fsdp.py) and Fp8AdamW on its DTensor shards (optim/_sharded.py), on 2 gloo
ranks: the parameter order and piece sizes FSDP2 uses, the FP8 reduce-scatter against FSDP2's own fp32 one
(SQNR floor of E4M3) with one synced scale per parameter, overflow on one rank seen on both, the FP8 weight
all-gather (identical weights on every rank, each FP8 weight the E4M3 round trip of the full weight at the
synced scale, the others bit-exact), and Fp8AdamW on shards bit-identical to one process on whole tensors."""

from __future__ import annotations

import torch
from torch import nn

from conftest import sqnr_db
from dist_utils import run_workers

# E4M3: 3 mantissa bits, relative rounding error <= 2**-4 per element: SQNR of a round trip ~ 30 dB;
# an fp32 mean of N=2 such values stays above 26 dB
E4M3_SQNR_FLOOR_DB = 26.0


def _model() -> nn.Module:
    from fp8train import convert_to_fp8
    from fp8train.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return convert_to_fp8(GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)))


def _shard(model: nn.Module, world: int, fp8: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fp8train.comm import Fp8CommConfig
    from fp8train.comm.fsdp import register_fp8_fsdp_comm

    mesh = init_device_mesh("cpu", (world,))
    for block in model.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if not fp8:
        return None, None
    return register_fp8_fsdp_comm(model, world, grad_config=Fp8CommConfig(), fp8_weight_gather=True)


def _backward(model: nn.Module, rank: int, poison: bool = False) -> None:
    x = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(rank))
    _, loss = model(x, x)
    (loss * (float("nan") if poison else 1.0)).backward()


def _fsdp_params(module: nn.Module) -> list:
    return module._get_fsdp_state()._fsdp_param_group.fsdp_params  # FSDP2's private state: read by this test only


def _comm_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from fp8train.comm import Fp8CommConfig
    from fp8train.comm.fsdp import group_segments, register_fp8_fsdp_comm
    from fp8train.formats import E4M3
    from fp8train.scaling import amax_to_log2_scale

    out: dict = {}
    plain = _model()  # unsharded: what this rank's backward sends
    _backward(plain, rank)
    sent_amax = torch.stack([p.grad.abs().max() for p in plain.parameters()])
    dist.all_reduce(sent_amax, op=dist.ReduceOp.MAX)
    out["expected_scales"] = dict(zip([n for n, _ in plain.named_parameters()],
                                      amax_to_log2_scale(sent_amax, E4M3).tolist()))
    ref = _model()
    _shard(ref, world, fp8=False)
    _backward(ref, rank)
    ref_grads = {n: p.grad.full_tensor() for n, p in ref.named_parameters()}
    fsdp_modules = [m for m in ref.modules() if isinstance(m, FSDPModule)]
    pairs = [(seg, fp) for m in fsdp_modules for seg, fp in zip(group_segments(m, world), _fsdp_params(m), strict=True)]
    out["order_ok"] = all(p is fp.sharded_param for (_, p, _), fp in pairs)
    out["sizes_ok"] = all(n == fp.padded_sharded_param_size.numel() for (_, _, n), fp in pairs)

    rs_only = _model()  # FP8 reduce-scatter, fp32 weights: the same local gradients as ``plain``
    _shard(rs_only, world, fp8=False)
    sink, _ = register_fp8_fsdp_comm(rs_only, world, grad_config=Fp8CommConfig(), fp8_weight_gather=False)
    _backward(rs_only, rank)
    stats, _ = sink.pop_stats()
    out["scales"] = stats.log2_scales_by_name()
    out["grad_sqnr"] = {n: sqnr_db(ref_grads[n], p.grad.full_tensor()) for n, p in rs_only.named_parameters()}
    out["grad_bytes"] = stats.bytes_sent

    model = _model()  # both FP8 collectives
    sink, scales = _shard(model, world, fp8=True)
    full = {n: p.full_tensor() for n, p in model.named_parameters()}  # DTensor gather: exact fp32
    _backward(model, rank)
    out["weight_bytes"] = sink.pop_stats()[1]
    out["fp8_names"] = [n for n, p in model.named_parameters() if p in scales.log2_scale]
    out["gather_scale"] = {n: float(scales.log2_scale[p]) for n, p in model.named_parameters() if p in scales.log2_scale}
    out["expected_gather_scale"] = {n: float(amax_to_log2_scale(full[n].abs().max(), E4M3)) for n in out["fp8_names"]}
    _backward(model, rank, poison=rank == 1)  # overflow on rank 1 only
    out["found_inf"] = sink.pop_stats()[0].found_inf
    return out


def test_fp8_reduce_scatter_and_weight_gather_on_fsdp2():
    results = run_workers(_comm_worker, 2, timeout_s=180)
    for res in results:
        assert res["order_ok"] and res["sizes_ok"], "group_segments must reproduce FSDP2's order and piece sizes"
        for name, db in res["grad_sqnr"].items():
            assert db > E4M3_SQNR_FLOOR_DB, (name, db)
        assert res["scales"] == res["expected_scales"], "one scale per parameter: its amax MAX-reduced over ranks"
        assert res["found_inf"], "an inf/NaN gradient on one rank is reported on every rank"
        assert res["fp8_names"] and all(n.endswith(".weight") for n in res["fp8_names"])
        assert res["gather_scale"] == res["expected_gather_scale"], "gather scale: amax of the whole weight, synced"
        assert res["weight_bytes"] > 0 and res["grad_bytes"] > 0


def _gather_worker(rank: int, world: int) -> dict:
    """The unsharded weights the forward uses (captured by a forward pre-hook) on each rank."""
    model = _model()
    _, scales = _shard(model, world, fp8=True)
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    seen: dict[str, torch.Tensor] = {}
    layer = model.h[0].attn.c_attn
    layer.register_forward_pre_hook(lambda m, args: seen.update(weight=m.weight.detach().clone(),
                                                                bias=m.bias.detach().clone()))
    _backward(model, rank)
    scale = float(scales.log2_scale[layer.weight])
    return {"seen": seen, "full": full, "scale": scale}


def test_fp8_weight_gather_gives_identical_round_tripped_weights():
    from fp8train.cast import cast_to_fp8
    from fp8train.formats import E4M3

    a, b = run_workers(_gather_worker, 2, timeout_s=180)
    for key in ("weight", "bias"):
        assert torch.equal(a["seen"][key], b["seen"][key]), "every rank gathers the same bits"
    weight = a["full"]["h.0.attn.c_attn.weight"]
    scale = torch.tensor(2.0 ** a["scale"])
    round_trip = cast_to_fp8(weight, scale, E4M3).to(torch.float32) / scale
    assert torch.equal(a["seen"]["weight"], round_trip), "FP8 weight: E4M3 codes at the synced scale"
    assert torch.equal(a["seen"]["bias"], a["full"]["h.0.attn.c_attn.bias"]), "other parameters: their own bytes"


def _optim_worker(rank: int, world: int) -> dict:
    """Fp8AdamW over FSDP2 shards, gradients set by hand to the same full values on every rank."""
    from torch.distributed.tensor import distribute_tensor

    from fp8train.optim import Fp8AdamW

    model = _model()
    _shard(model, world, fp8=False)
    opt = Fp8AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(7)
    for step in range(3):
        for p in model.parameters():
            g = torch.randn(p.shape, generator=gen) * 10.0 ** (step - 2)
            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
        opt.step()
    return {"params": {n: p.full_tensor() for n, p in model.named_parameters()},
            "scales": {k: v.clone() for k, v in opt.log2_scales().items()}}


def test_fp8_adamw_on_dtensor_shards_is_bit_identical_to_one_process():
    from fp8train.optim import Fp8AdamW

    results = run_workers(_optim_worker, 2, timeout_s=180)
    model = _model()
    opt = Fp8AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(7)
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** (step - 2)
        opt.step()
    for res in results:
        for n, p in model.named_parameters():
            assert torch.equal(res["params"][n], p.detach()), n
        for k, v in opt.log2_scales().items():
            assert torch.equal(res["scales"][k], v), k


def _finer_gather_worker(rank: int, world: int, granularity: str) -> dict:
    """A layer's gathered weight, its input and output (hooks), and the output of an unsharded copy of that
    layer holding the full high-precision weight, on the same input."""
    from fp8train import Fp8Config, Fp8Linear, convert_to_fp8
    from fp8train.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    config = Fp8Config(granularity=granularity)
    # n_embd 48: c_attn is 144 x 48, so at N = 2 each rank holds 72 rows and the first 128 x 128 block
    # spans both ranks; 48 columns: one full block of 32 and a partial one (mx)
    model = convert_to_fp8(GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=48)),
                           config=config)
    with torch.no_grad():  # outlier rows: a per-tensor scale would flush the other rows' small values
        model.h[0].attn.c_attn.weight[:2] *= 1e4
    _, scales = _shard(model, world, fp8=True)
    layer = model.h[0].attn.c_attn
    full_weight = layer.weight.full_tensor().detach().clone()
    full_bias = layer.bias.full_tensor().detach().clone()
    seen: dict[str, torch.Tensor] = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(
        weight=m.weight.detach().clone(), x=args[0].detach().clone(), y=out.detach().clone()))
    _backward(model, rank)
    reference = Fp8Linear(48, 144, config=config)
    with torch.no_grad():
        reference.weight.copy_(full_weight)
        reference.bias.copy_(full_bias)
        y_reference = reference(seen["x"])
    return {**seen, "y_reference": y_reference, "full_weight": full_weight,
            "log2_scale": scales.log2_scale[layer.weight].clone(), "block": scales.block[layer.weight]}


def test_finer_granularity_weight_gather_carries_block_scales_and_keeps_the_forward_exact():
    from fp8train.cast import cast_to_fp8_reference
    from fp8train.formats import E4M3
    from fp8train.tensor import expand_block_scales

    for granularity, block in (("block", (128, 128)), ("rowwise", (1, 48)), ("mx", (1, 32))):
        a, b = run_workers(_finer_gather_worker, 2, granularity, timeout_s=180)
        assert torch.equal(a["weight"], b["weight"]), f"{granularity}: every rank gathers the same bits"
        assert a["block"] == block and torch.equal(a["log2_scale"], b["log2_scale"])
        # the gathered weight is the per-block E4M3 round trip of the WHOLE weight (blocks spanning ranks
        # included): scales from the amax of each whole block
        w = a["full_weight"]
        scale = torch.exp2(expand_block_scales(a["log2_scale"], block, w.shape))
        round_trip = cast_to_fp8_reference(w, scale, E4M3).to(torch.float32) / scale
        assert torch.equal(a["weight"], round_trip), granularity
        assert not torch.equal(a["weight"], w), f"{granularity}: the weights did travel as E4M3"
        per_tensor = torch.exp2(a["log2_scale"].min())  # what a per-tensor gather would have sent
        assert not torch.equal(a["weight"], cast_to_fp8_reference(w, per_tensor, E4M3).to(torch.float32) / per_tensor)
        # the layer's own forward cast of the gathered weight is exact: the output is the unsharded layer's
        for res in (a, b):
            assert torch.equal(res["y"], res["y_reference"]), f"{granularity}: forward output differs"
