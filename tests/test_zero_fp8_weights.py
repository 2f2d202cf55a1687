"""FP8 compute-weight all-gather of whole-tensor ZeRO (``ZeroOptimizer(fp8_weight_names=...)``), on 2
and 4 gloo processes, with an FP8-converted GPT whose ``Fp8Linear`` weights travel as E4M3.

Tolerance tier: bit-exact (``torch.equal``) throughout. The E4M3 round trip of a weight is
deterministic arithmetic (amax, power-of-two scale, round-to-nearest-even cast, exact power-of-two
decode), so every rank, and an independent reference that recomputes it from the owner's master
with torch's own float8 cast, get the same bits. The single-process comparison feeds both paths
bit-identical gradients (see ``_equivalence``), so nothing there rounds differently either."""

from __future__ import annotations

import functools
import math
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fp8train import Fp8Linear, convert_to_fp8
from fp8train.comm import ZeroConfig, ZeroOptimizer, fp8_all_reduce_, load_zero_checkpoint, save_zero_checkpoint
from fp8train.models import GPT, GPTConfig
from fp8train.optim import Fp8AdamW

from dist_utils import run_workers

# ---- helpers -------------------------------------------------------------------------------------


def _model() -> GPT:
    torch.manual_seed(0)  # the same init on every rank and for every copy
    return convert_to_fp8(GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64)))


def _fp8_names(model: nn.Module) -> list[str]:
    """What the trainer passes: the weight of every Fp8Linear."""
    return [f"{fqn}.weight" for fqn, m in model.named_modules() if isinstance(m, Fp8Linear)]


def _adamw(params: list[torch.nn.Parameter]) -> Fp8AdamW:
    return Fp8AdamW(params, lr=3e-3, weight_decay=0.1)  # fp16 master (the default)


def _zero(model: nn.Module, *, stage: int = 2, names: list[str] | None = None, factory=_adamw,
          group: dist.ProcessGroup | None = None) -> ZeroOptimizer:
    return ZeroOptimizer(model.named_parameters(), factory, config=ZeroConfig(stage=stage), group=group,
                         fp8_weight_names=_fp8_names(model) if names is None else names)


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(seed))


def _backward(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    for p in model.parameters():
        p.grad = None
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach()


def _e4m3_round_trip(w: torch.Tensor) -> torch.Tensor:
    """Independent reference of the owner's encoding: scale 2**n with n the largest integer such that
    amax * 2**n <= 448 (Python floats: products with powers of two are exact), clamp, torch's own
    float8_e4m3fn cast (round to nearest even), decode, round to w's dtype."""
    amax = float(w.abs().max())
    n = math.floor(math.log2(448.0 / amax))
    n -= amax * 2.0**n > 448.0
    n += amax * 2.0 ** (n + 1) <= 448.0
    codes = (w.to(torch.float32) * 2.0**n).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return (codes.to(torch.float32) * 2.0**-n).to(w.dtype)


def _weight_log2_scales(zero: ZeroOptimizer) -> dict[str, torch.Tensor]:
    return {n: e["weight_log2_scale"].clone() for n, e in zero.state_dict()["param_state"].items()
            if "weight_log2_scale" in e}


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- single process ------------------------------------------------------------------------------


@pytest.mark.parametrize("case, names, message", [
    ("unknown_name", ["h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.wieght"], "'h.0.mlp.c_fc.wieght' is not the name"),
    ("one_string", "h.0.mlp.c_fc.weight", "fp8_weight_names='h.0.mlp.c_fc.weight' is one string"),
])
def test_bad_names_are_rejected_before_any_collective(case, names, message):
    with pytest.raises(ValueError, match=message):  # no process group here: raised before dist is used
        _zero(_model(), names=names)


# ---- distributed workers -------------------------------------------------------------------------


def _count_all_gathers() -> dict[str, int]:
    """Wrap this worker's weight all-gather entry point to count its calls (test-side only)."""
    calls = {"all_gather": 0}
    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    fn = getattr(dist, name)

    def wrapper(*args, **kwargs):
        calls["all_gather"] += 1
        return fn(*args, **kwargs)

    setattr(dist, name, wrapper)
    return calls


def _train(rank: int, world_size: int, calls: dict[str, int], steps: int, inf_step: int) -> dict:
    model = _model()
    zero = _zero(model)
    flags, scales = [], []
    for step in range(steps):
        _backward(model, _tokens(1000 * step + rank))
        if step == inf_step and rank == world_size - 1:
            model.h[1].mlp.c_fc.weight.grad[3, 5] = float("inf")
        before = calls["all_gather"]
        result = zero.step()
        flags.append((result.skipped, result.weight_bytes_sent, calls["all_gather"] - before))
        scales.append(_weight_log2_scales(zero))
    # (2): on the owner, each FP8 weight is the E4M3 round trip of the master its optimizer decodes
    round_trip_ok, rounded = {}, {}
    for name in zero.owned_parameter_names:
        if name in zero.fp8_weight_names:
            p = model.get_parameter(name)
            state = zero.optimizer.state[p]
            decoded = (state["master_scaled"].to(torch.float32) * torch.exp2(-state["master_log2_scale"])).to(p.dtype)
            round_trip_ok[name] = torch.equal(p, _e4m3_round_trip(decoded))
            rounded[name] = not torch.equal(p, decoded)
    # the forward's own re-quantization (current recipe, margin 0) gives back the very same values
    forward_exact = {fqn: torch.equal(m.weight_scaling.quantize(m.weight).dequantize(), m.weight.detach())
                     for fqn, m in model.named_modules() if isinstance(m, Fp8Linear)}
    # (4): one step of a lossless and of an all-FP8 optimizer on the same model and batch
    bytes_of = {}
    for key, names in (("lossless", []), ("fp8_linear", None), ("all", [n for n, _ in model.named_parameters()])):
        other = _model()
        other_zero = _zero(other, names=names)
        _backward(other, _tokens(rank))
        bytes_of[key] = other_zero.step().weight_bytes_sent
    return dict(params=_params(model), flags=flags, scales=scales, round_trip_ok=round_trip_ok, rounded=rounded,
                forward_exact=forward_exact, bytes_of=bytes_of, owner=zero.partition.owner,
                names=zero.names, fp8_names=zero.fp8_weight_names,
                numels=[p.numel() for p in zero.params], element_sizes=[p.element_size() for p in zero.params])


def _equivalence(rank: int, world_size: int, solo: dist.ProcessGroup, stage: int, steps: int) -> dict:
    """ZeRO (this rank and the others) against one process on its own, both on the SAME batch on
    every rank. The single-process reference: its gradients through fp8_all_reduce_ on a 1-rank group
    (the same FP8 round trip of the gradient: with identical gradients on N ranks, the shared scale is
    the same and the mean of N equal codes is the code itself, exactly), plain Fp8AdamW over all
    parameters, then the independent E4M3 round trip of the FP8 weights."""
    zero_model, ref_model = _model(), _model()
    zero = _zero(zero_model, stage=stage)
    ref = _adamw(list(ref_model.parameters()))
    names = set(_fp8_names(ref_model))
    losses = []
    for step in range(steps):
        tokens = _tokens(step)
        zero_loss = _backward(zero_model, tokens)
        assert not zero.step().skipped
        ref_loss = _backward(ref_model, tokens)
        stats = fp8_all_reduce_([p.grad for p in ref_model.parameters()], group=solo)
        # the sync's amax bounds, as ZeroOptimizer passes them (stats follow the gradients' order)
        ref.step(found_inf=stats.found_inf, grad_amax=dict(zip(ref_model.parameters(), stats.grad_amax, strict=True)))
        with torch.no_grad():
            for n, p in ref_model.named_parameters():
                if n in names:
                    p.copy_(_e4m3_round_trip(p))
        losses.append((zero_loss, ref_loss))
    return dict(losses=losses, zero=_params(zero_model), ref=_params(ref_model))


class _TwoMatrices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Parameter(torch.randn(32, 32) * 0.1)
        self.z = nn.Parameter(torch.randn(32, 32) * 0.1)  # gradient always 0

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.a).square().mean() + (self.z * 0).sum()


def _zero_amax(rank: int, world_size: int) -> dict:
    """z's gradient is 0; lr 0.5 and then weight_decay 2.0 give decay 1 - lr * wd = 0 exactly, so
    its second step writes an all-zero weight: amax 0 for the FP8 encoding."""
    model = _TwoMatrices()

    def factory(ps):
        groups = [{"params": [p for p in ps if p is model.z], "lr": 0.5, "weight_decay": 0.0},
                  {"params": [p for p in ps if p is model.a]}]
        return Fp8AdamW([g for g in groups if g["params"]], lr=1e-2, weight_decay=0.0)

    zero = ZeroOptimizer(model.named_parameters(), factory, config=ZeroConfig(), fp8_weight_names=["a", "z"])
    scales = []
    for step in range(3):
        if step == 1 and zero.optimizer is not None:
            for g in zero.optimizer.param_groups:
                if any(p is model.z for p in g["params"]):
                    g["weight_decay"] = 2.0
        zero.zero_grad()
        model.loss(torch.randn(8, 32, generator=torch.Generator().manual_seed(step))).backward()
        assert not zero.step().skipped
        scales.append(_weight_log2_scales(zero))
    return dict(scales=scales, z=model.z.detach().clone(), a=model.a.detach().clone())


def _errors(rank: int, world_size: int) -> dict:
    factories = {
        "torch_adamw": lambda ps: torch.optim.AdamW(ps),
        "no_master": lambda ps: Fp8AdamW(ps, master_dtype=None),
        "rank_1_has_no_master": lambda ps: Fp8AdamW(ps) if rank == 0 else torch.optim.AdamW(ps),
    }
    out = {}
    for case, factory in factories.items():
        try:
            _zero(_model(), factory=factory)
            out[case] = None
        except ValueError as err:
            out[case] = str(err)
    _zero(_model(), names=[], factory=factories["torch_adamw"])  # lossless weights need no master
    return out


def _checkpoint(rank: int, world_size: int, solo: dist.ProcessGroup, directory: str) -> dict:
    def train(model, zero, steps):
        for step in steps:
            _backward(model, _tokens(1000 * step + rank))
            assert not zero.step().skipped

    model = _model()
    zero = _zero(model)
    train(model, zero, range(3))
    save_zero_checkpoint(zero, model, directory)
    saved = _weight_log2_scales(zero)
    train(model, zero, range(3, 6))
    resumed_model = _model()
    resumed = _zero(resumed_model)
    load_zero_checkpoint(resumed, resumed_model, directory)
    loaded = _weight_log2_scales(resumed)
    train(resumed_model, resumed, range(3, 6))
    # one rank alone owns every parameter: it reads every rank's file, routed by name
    alone_model = _model()
    alone = _zero(alone_model, group=solo)
    load_zero_checkpoint(alone, alone_model, directory)
    return dict(saved=saved, loaded=loaded, uninterrupted=_params(model), resumed=_params(resumed_model),
                alone=_weight_log2_scales(alone))


def _worker(rank: int, world_size: int, train_run: tuple[int, int], with_others: bool, directory: str) -> dict:
    calls = _count_all_gathers()
    out = {"train": _train(rank, world_size, calls, *train_run)}
    if with_others:
        solo = [dist.new_group([r]) for r in range(world_size)][rank]  # every rank creates every group
        out["equivalence"] = {stage: _equivalence(rank, world_size, solo, stage, steps)
                              for stage, steps in ((1, 4), (2, 6))}
        out["zero_amax"] = _zero_amax(rank, world_size)
        out["errors"] = _errors(rank, world_size)
        out["checkpoint"] = _checkpoint(rank, world_size, solo, directory)
    return out


# (steps, inf_step) of the training run; the world size 2 run also does everything else. Starting the
# processes and the first step's warm-up dominate, so each world size starts its processes once.
TRAIN_RUNS = {2: (6, 2), 4: (4, 1)}


@functools.cache
def _results(world_size: int) -> tuple[dict, ...]:
    with tempfile.TemporaryDirectory() as directory:
        return tuple(run_workers(_worker, world_size, TRAIN_RUNS[world_size], world_size == 2, directory,
                                 timeout_s=180))


# ---- distributed tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 4])
def test_weights_are_bit_identical_on_every_rank(world_size):
    results = [res["train"] for res in _results(world_size)]
    init = _params(_model())
    assert results[0]["fp8_names"] and set(results[0]["fp8_names"]) < set(results[0]["names"])
    for name, p in results[0]["params"].items():
        assert not torch.equal(p, init[name]), f"{name} never changed"
        for r, res in enumerate(results[1:], 1):
            assert torch.equal(res["params"][name], p), f"{name} differs between rank 0 and rank {r}"


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_fp8_weight_is_the_e4m3_round_trip_of_its_owners_master(world_size):
    results = [res["train"] for res in _results(world_size)]
    checked = {}
    for res in results:
        checked.update(res["round_trip_ok"])
    assert set(checked) == set(results[0]["fp8_names"]), "every FP8 weight is checked on its owner"
    assert all(checked.values()), [n for n, ok in checked.items() if not ok]
    assert any(r for res in results for r in res["rounded"].values()), "the rounding must be visible"


def test_the_forward_requantizes_the_gathered_weights_exactly():
    for res in _results(2):
        exact = res["train"]["forward_exact"]
        assert exact and all(exact.values()), [fqn for fqn, ok in exact.items() if not ok]


@pytest.mark.parametrize("stage", [1, 2])
def test_two_rank_zero_matches_one_process_applying_the_same_round_trip(stage):
    for res in _results(2):
        run = res["equivalence"][stage]
        for step, (zero_loss, ref_loss) in enumerate(run["losses"]):
            assert torch.equal(zero_loss, ref_loss), f"step {step}: loss {zero_loss} vs {ref_loss}"
        assert len({float(z) for z, _ in run["losses"]}) == len(run["losses"]), "the loss must move"
        for name, p in run["zero"].items():
            assert torch.equal(p, run["ref"][name]), f"{name} differs from the single-process reference"


@pytest.mark.parametrize("world_size", [2, 4])
def test_weight_bytes_follow_the_slot_plan_and_a_skipped_step_sends_none(world_size):
    results = [res["train"] for res in _results(world_size)]
    first = results[0]
    fp8 = [n in first["fp8_names"] for n in first["names"]]
    used = [0] * world_size  # numel + 4 or numel * element_size, each rounded up to 16 bytes
    for numel, size, owner, is_fp8 in zip(first["numels"], first["element_sizes"], first["owner"], fp8):
        used[owner] += -(-(numel + 4 if is_fp8 else numel * size) // 16) * 16
    expected = (world_size - 1) * max(used)
    _, inf_step = TRAIN_RUNS[world_size]
    for res in results:
        for step, (skipped, nbytes, gathers) in enumerate(res["flags"]):
            assert skipped == (step == inf_step)
            assert (nbytes, gathers) == ((0, 0) if skipped else (expected, 1)), f"step {step}"
        before, after = res["scales"][inf_step - 1], res["scales"][inf_step]  # the skipped step's biases
        assert before.keys() == after.keys() and all(torch.equal(after[n], s) for n, s in before.items())


def test_fp8_weights_send_about_a_quarter_of_the_fp32_bytes():
    for res in _results(2):
        sent = res["train"]["bytes_of"]
        assert sent["all"] < sent["fp8_linear"] < sent["lossless"]
        # 1 byte instead of 4 per element, plus 4 bytes of scale_inv and up to 15 of alignment per
        # tensor: < 19 bytes x 28 tensors over ~59 kB of codes in the largest slot, < 1%
        assert 0.25 <= sent["all"] / sent["lossless"] < 0.26, sent


def test_an_optimizer_without_a_master_is_rejected_on_every_rank():
    results = [res["errors"] for res in _results(2)]
    for rank, errors in enumerate(results):
        assert "updates the parameter itself" in errors["torch_adamw"]
        assert "master_dtype=None" in errors["no_master"]
        # only rank 1's optimizer lacks a master: rank 0 raises too, instead of waiting for rank 1
        expected = "not so on rank(s) [1]" if rank == 0 else "updates the parameter itself"
        assert expected in errors["rank_1_has_no_master"]
        for message in errors.values():
            assert message.startswith("ZeroOptimizer.fp8_weight_names needs an inner optimizer that keeps its own "
                                      "master weight") and "\n" not in message


def test_amax_zero_keeps_the_previous_scale():
    results = [res["zero_amax"] for res in _results(2)]
    scales = {}  # step -> name -> bias, from the owners
    for res in results:
        for step, per_name in enumerate(res["scales"]):
            scales.setdefault(step, {}).update(per_name)
        assert torch.equal(res["z"], torch.zeros(32, 32)) and torch.equal(res["a"], results[0]["a"])
    z_bias = float(scales[0]["z"])
    assert z_bias > 0, "the first step sets a fresh scale from z's amax"
    assert float(scales[1]["z"]) == float(scales[2]["z"]) == z_bias, "amax 0 keeps it"


def test_checkpoint_round_trip_restores_the_weight_scales_and_resumes_bit_exact():
    results = [res["checkpoint"] for res in _results(2)]
    union = {}
    for res in results:
        assert res["saved"] and set(res["saved"]) == set(res["loaded"])
        for name, bias in res["saved"].items():
            assert torch.equal(res["loaded"][name], bias) and float(bias) != 0, name
        union.update(res["saved"])
        for name, p in res["uninterrupted"].items():
            assert torch.equal(res["resumed"][name], p), f"{name}: the resumed run left the trajectory"
    assert set(union) == set(results[0]["alone"]) == set(_fp8_names(_model()))
    for res in results:
        assert all(torch.equal(res["alone"][n], union[n]) for n in union)
