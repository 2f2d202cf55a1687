"""FP8 for Hugging Face GPT-2's ``Conv1D`` (a linear layer with a transposed weight, (in, out)):
which layers ``convert_to_fp8`` swaps, the numerics against the high-precision layer and model, a
short training run, state_dict compatibility, FP8 primary weights refused, and the trainer's
``model=hf`` path with a GPT-2 config."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from conftest import hp_tol, markov_train_losses, sqnr_db  # noqa: E402
from test_linear import GRAD_FLOOR_DB, Y_FLOOR_DB  # noqa: E402  (the Fp8Linear floors and their derivation)
from trainer_utils import tiny_config  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from fp8train import Fp8Config, Fp8Linear, convert_to_fp8  # noqa: E402
from fp8train.conv1d import Fp8Conv1D  # noqa: E402
from fp8train.convert import conversion_targets  # noqa: E402
from fp8train.models import build_hf_causal_lm  # noqa: E402
from fp8train.trainer.run import train  # noqa: E402
from fp8train.trainer.run_log import read_metrics  # noqa: E402

VOCAB, BLOCK = 64, 32
CONFIG = Fp8Config(recipe="current", backend="emulated")
# the four Conv1D projections of one GPT-2 block, in registration order
PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _gpt2(n_embd: int = 64, n_layer: int = 2, **extra) -> nn.Module:
    """A random-init GPT2LMHeadModel (nothing downloaded), dropout off so that two forwards compare."""
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=n_embd, n_layer=n_layer, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **extra)
    return transformers.GPT2LMHeadModel(cfg)


def _names(model: nn.Module, cls: type) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


CONVERSION_CASES = [  # (case, n_embd, convert_to_fp8 kwargs, expected converted projections per block)
    ("every Conv1D", 64, {}, PROJECTIONS),
    ("module_filter_fn", 64, dict(module_filter_fn=lambda m, fqn: ".mlp." in fqn), ("mlp.c_fc", "mlp.c_proj")),
    # n_embd 40: c_attn 40x120, c_proj 40x40, c_fc 40x160, mlp.c_proj 160x40: 40 is not a multiple of 16
    ("dims not multiples of 16", 40, {}, ()),
]


@pytest.mark.parametrize(("case", "n_embd", "kwargs", "expected"), CONVERSION_CASES,
                         ids=[c[0] for c in CONVERSION_CASES])
def test_conv1d_layers_are_converted_with_the_linear_rules(case: str, n_embd: int, kwargs: dict,
                                                           expected: tuple[str, ...]) -> None:
    model = _gpt2(n_embd)
    assert len(_names(model, Conv1D)) == 4 * 2  # 4 per block, 2 blocks
    convert_to_fp8(model, config=CONFIG, **kwargs)
    assert _names(model, Fp8Conv1D) == [f"transformer.h.{i}.{p}" for i in range(2) for p in expected]
    assert len(_names(model, Conv1D)) == 8 - 2 * len(expected)  # the rest stay transformers' Conv1D
    assert type(model.lm_head) is nn.Linear  # the (tied) output head stays high precision
    assert all(isinstance(m, Fp8Linear) for m in model.modules() if isinstance(m, Fp8Conv1D))


def test_transformer_engine_targets_leave_conv1d_alone() -> None:
    # TE's Linear stores its weight (out, in): a Conv1D would need a renamed or copied parameter, so
    # the targets convert_to_te swaps (the default) do not include it; convert_to_fp8's do.
    model = _gpt2()
    assert conversion_targets(model) == []
    assert len(conversion_targets(model, include_conv1d=True)) == 8


SCALINGS = [  # (recipe, granularity, backend): per tensor with both recipes, the finer scales, and
    # scaled_mm (torch runs it on CPU too), whose casts also write the transposed codes
    ("current", "tensor", "emulated"), ("delayed", "tensor", "emulated"), ("current", "rowwise", "emulated"),
    ("current", "block", "emulated"), ("current", "mx", "emulated"), ("current", "tensor", "scaled_mm"),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("recipe", "granularity", "backend"), SCALINGS, ids=["-".join(c) for c in SCALINGS])
def test_fp8_conv1d_is_fp8_linear_on_the_transposed_weight(recipe: str, granularity: str, backend: str,
                                                           bias: bool) -> None:
    # Tier 1, bit-exact: the Conv1D layer and an Fp8Linear holding a contiguous copy of W^T cast the
    # same codes with the same scales and run the same GEMMs (fp32 sums of exact products, in the
    # same order). A per-tensor scale does not see the transpose; row/block/MX scales do: they must
    # follow the GEMM operand W^T (out, in) along its reduction dim, not the (in, out) storage.
    conv = Conv1D(256, 128)  # in 128: one 1x128 block / four MX blocks of 32 along the reduction dim
    if not bias:
        conv.bias = None
    config = Fp8Config(recipe=recipe, granularity=granularity, backend=backend)
    linear = nn.Linear(128, 256, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if bias:
            linear.bias.copy_(conv.bias)
    layer, reference = Fp8Conv1D.from_conv1d(conv, config), Fp8Linear.from_linear(linear, config)
    assert layer.weight is conv.weight and layer.weight.shape == (128, 256)
    x, dy = torch.randn(3, 5, 128), torch.randn(3, 5, 256)
    for _ in range(2):  # the second pass: delayed scaling on its history
        outs = []
        for fp8 in (layer, reference):
            fp8.zero_grad()
            xi = x.clone().requires_grad_()
            y = fp8(xi)
            y.backward(dy)
            outs.append((y, xi.grad, fp8.weight.grad))
        (y, dx, dw), (y_ref, dx_ref, dw_ref) = outs
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0)
        torch.testing.assert_close(dw, dw_ref.t(), rtol=0, atol=0)
    for role in ("input_scaling", "weight_scaling", "grad_output_scaling"):
        assert torch.equal(getattr(layer, role).log2_scale, getattr(reference, role).log2_scale), role


def test_each_converted_layer_meets_the_fp8_linear_floors() -> None:
    # Tier 2 against an fp64 Conv1D (y = x @ W + b): the floors of tests/test_linear.py (derived there).
    torch.manual_seed(0)
    conv = Conv1D(96, 64)
    with torch.no_grad():
        conv.bias.normal_(std=0.02)
    layer = Fp8Conv1D.from_conv1d(conv, CONFIG)
    x, dy = torch.randn(4, 7, 64), torch.randn(4, 7, 96)
    xi = x.clone().requires_grad_()
    y = layer(xi)
    y.backward(dy)
    x64 = x.double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (conv.weight, conv.bias))
    y64 = x64 @ w64 + b64
    y64.backward(dy.double())
    assert layer.weight.grad.shape == (64, 96)
    assert sqnr_db(y64, y) > Y_FLOOR_DB
    assert sqnr_db(x64.grad, xi.grad) > GRAD_FLOOR_DB
    assert sqnr_db(w64.grad, layer.weight.grad) > GRAD_FLOOR_DB
    torch.testing.assert_close(layer.bias.grad.double(), b64.grad, **hp_tol(torch.float32))  # sum of dy, fp32


def test_gpt2_logits_stay_near_the_high_precision_model() -> None:
    torch.manual_seed(0)
    model = _gpt2()
    idx = torch.randint(0, VOCAB, (4, BLOCK))
    with torch.no_grad():
        logits_hp = model(input_ids=idx).logits.double()
        convert_to_fp8(model, config=CONFIG)
        logits_fp8 = model(input_ids=idx).logits
    assert len(_names(model, Fp8Conv1D)) == 8
    # Tier 2. Each FP8 GEMM adds noise at 28.9 dB (tests/test_linear.py); if the 8 GEMMs' noises all
    # reached the logits in full they would add to 28.9 - 10 log10(8) = 19.9 dB. The residual stream
    # carries the embeddings past them: measured 30.9-31.4 dB (seeds 0-2), so the floor is the
    # Fp8Linear forward floor, Y_FLOOR_DB (3 dB under the one-GEMM model).
    assert sqnr_db(logits_hp, logits_fp8) > Y_FLOOR_DB


def test_gpt2_trains_in_fp8() -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="Conv1D"):  # the bf16 emulation still keeps them in fp32
        model = build_hf_causal_lm("transformers.GPT2Config", dict(n_embd=64, n_layer=2, n_head=4),
                                   vocab_size=VOCAB, block_size=BLOCK)
    convert_to_fp8(model, config=CONFIG)
    assert len(_names(model, Fp8Conv1D)) == 8
    weight = model.hf_model.transformer.h[0].attn.c_attn.weight
    before = weight.detach().clone()
    losses = markov_train_losses(model, 20)
    assert not torch.equal(weight, before) and weight.shape == before.shape  # the FP8 layers' weights learn
    # From ln(64) = 4.16 at init; 20 steps at lr 3e-3 learn at least the chain's unigram statistics.
    # 0.5 nats is well above the batch noise (~0.1).
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


def test_state_dict_names_and_shapes_are_unchanged_and_a_pre_conversion_one_loads() -> None:
    source = _gpt2()
    saved = source.state_dict()
    model = _gpt2()
    params_before = dict(model.named_parameters())
    convert_to_fp8(model, config=CONFIG)
    assert len(_names(model, Fp8Conv1D)) == 8
    # names and Parameter objects are kept (an optimizer keyed by either stays valid)
    after = dict(model.named_parameters())
    assert after.keys() == params_before.keys() and all(after[k] is params_before[k] for k in after)
    state = model.state_dict()
    plain = {k: v for k, v in state.items() if "_scaling." not in k}
    assert list(plain) == list(saved) and all(plain[k].shape == saved[k].shape for k in saved)
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D's (in, out)
    model.load_state_dict(saved, strict=True)  # the scaling state keeps its initial values
    for name, tensor in saved.items():  # lossless: tier 1
        assert torch.equal(model.state_dict()[name], tensor), name


def test_fp8_primary_weights_are_refused_naming_the_layer() -> None:
    model = _gpt2(tie_word_embeddings=False)
    with pytest.raises(ValueError, match="'transformer.h.0.attn.c_attn' is a transformers Conv1D") as err:
        convert_to_fp8(model, config=CONFIG, fp8_weights=True)
    assert "\n" not in str(err.value) and "module_filter_fn" in str(err.value)
    assert not _names(model, Fp8Linear)  # refused before anything was swapped


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_trainer_model_hf_with_a_gpt2_config_runs_its_conv1d_in_fp8(tmp_path, cache_dir) -> None:
    # configs/model/hf.yaml's Llama kwargs, read by GPT2Config through its attribute_map
    # (hidden_size -> n_embd = 128, ...), less the two GPT-2 has no field for
    cfg = tiny_config(tmp_path / "run", "model=hf", "model.config._target_=transformers.GPT2Config",
                      "~model.config.intermediate_size", "~model.config.num_key_value_heads", "train.steps=6",
                      "checkpoint.every=0", "logging.log_every=1", f"data.cache_dir={cache_dir}")
    with pytest.warns(UserWarning, match="Conv1D"):
        result = train(cfg)
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert result.step == 6 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    biases = {k for r in read_metrics(tmp_path / "run") for k in r if "/weight/scaling_bias/" in k}
    # every Conv1D of both blocks ran in FP8 (GPT-2's names map to qkv, attn_out, ffn_in, ffn_out)
    assert biases == {f"fp8/{t}/weight/scaling_bias/L{i}" for t in ("qkv", "attn_out", "ffn_in", "ffn_out")
                      for i in range(2)}
