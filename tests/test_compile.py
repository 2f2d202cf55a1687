"""FP8 models under torch.compile: converted GPT, Llama and HF Llama trace with no graph break
(``torch._dynamo.explain``), compile whole (``fullgraph=True``) through AOTAutograd, forward and
backward, and train step for step like eager: the same scaling biases and event counters after
every step; amaxes and losses within fp32 rounding (tier 3)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from fp8train import Fp8Config, Fp8Linear, convert_to_fp8
from fp8train.cast import FAST_CAST_MIN_NUMEL
from fp8train.models import GPT, GPTConfig, Llama, LlamaConfig
from conftest import hp_tol

VOCAB, BLOCK, BATCH, WIDTH = 64, 128, 8, 64
RECIPES = ["current", "delayed"]
# B * T * C reaches the compiled CPU cast's size floor, so eager takes the fast path and compile
# must give way to inductor (the fast cast itself cannot be traced)
assert BATCH * BLOCK * WIDTH >= FAST_CAST_MIN_NUMEL


def _gpt() -> nn.Module:
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=1, n_head=4, n_embd=WIDTH))


def _llama() -> nn.Module:
    return Llama(LlamaConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=1, n_head=4, n_kv_head=2, n_embd=WIDTH))


def _hf_llama() -> nn.Module:
    pytest.importorskip("transformers")
    from fp8train.models import build_hf_causal_lm

    return build_hf_causal_lm("transformers.LlamaConfig", dict(hidden_size=WIDTH, num_hidden_layers=1,
                                                                num_attention_heads=4, intermediate_size=128),
                              vocab_size=VOCAB, block_size=BLOCK)


MODELS: dict[str, Callable[[], nn.Module]] = {"gpt": _gpt, "llama": _llama, "hf_llama": _hf_llama}


def _fp8_model(name: str, recipe: str) -> nn.Module:
    torch.manual_seed(0)
    return convert_to_fp8(MODELS[name](), config=Fp8Config(recipe=recipe))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (BATCH, BLOCK + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _graph_breaks(model: nn.Module) -> tuple[int, list[str]]:
    idx, targets = _batch(0)
    explanation = torch._dynamo.explain(model)(idx, targets)
    return explanation.graph_break_count, [r.reason for r in explanation.break_reasons]


def test_the_unconverted_hf_llama_traces_with_no_graph_break() -> None:
    """The baseline: whatever breaks in a converted model, FP8 put it there."""
    torch.manual_seed(0)
    assert _graph_breaks(_hf_llama()) == (0, [])


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_a_converted_model_traces_with_no_graph_break(name: str, recipe: str) -> None:
    model = _fp8_model(name, recipe)
    assert any(isinstance(m, Fp8Linear) for m in model.modules())
    assert _graph_breaks(model) == (0, [])


def _scaling_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "_scaling." in k}


def _sgd_step(model: nn.Module, forward: Callable, step: int, lr: float = 0.5) -> float:
    _, loss = forward(*_batch(step))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
            p.grad = None
    return loss.item()


def _assert_trains_like_eager(name: str, recipe: str, backend: str, steps: int = 3) -> None:
    """Lockstep: before every step the compiled model gets the eager model's weights (not its
    scaling state), so each step compares compiled with eager from the same point; the scaling
    state evolves on its own in each."""
    eager = _fp8_model(name, recipe)
    compiled = _fp8_model(name, recipe)
    compiled_forward = torch.compile(compiled, backend=backend, fullgraph=True)
    for step in range(steps):
        with torch.no_grad():
            for p_compiled, p_eager in zip(compiled.parameters(), eager.parameters()):
                p_compiled.copy_(p_eager)
        eager_loss = _sgd_step(eager, eager, step)
        compiled_loss = _sgd_step(compiled, compiled_forward, step)
        torch.testing.assert_close(compiled_loss, eager_loss, **hp_tol(torch.float32))
        got, expected = _scaling_state(compiled), _scaling_state(eager)
        assert got.keys() == expected.keys()
        # the biases and event counters exactly; the recorded amaxes are activations' and gradients'
        # maxima, which fused kernels move by fp32 rounding
        differing = [k for k in expected if not k.endswith("amax_history") and not torch.equal(got[k], expected[k])]
        assert not differing, f"step {step}: scaling state differs from eager in {differing[:4]}"
        for k in (k for k in expected if k.endswith("amax_history")):
            torch.testing.assert_close(got[k], expected[k], **hp_tol(torch.float32))
    n_casts = [v for k, v in _scaling_state(compiled).items() if k.endswith("n_casts")]
    assert n_casts and all(int(n) == steps for n in n_casts)  # every role cast once per step, backward too


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_fullgraph_compile_through_aot_autograd_trains_like_eager(name: str, recipe: str) -> None:
    """aot_eager: dynamo + AOTAutograd (the joint forward/backward graph, buffer mutations in the
    backward included) without inductor's code generation."""
    _assert_trains_like_eager(name, recipe, "aot_eager")


@pytest.mark.parametrize("recipe", RECIPES)
def test_inductor_compiled_gpt_trains_like_eager(recipe: str) -> None:
    """Inductor generates the casts (C++ here, Triton on GPU): bit-exact casts keep the scaling
    state identical; fused elementwise code moves the losses by fp32 rounding only."""
    _assert_trains_like_eager("gpt", recipe, "inductor")


def test_a_compiled_model_checkpoints_its_scaling_state() -> None:
    """Compiling in place (``nn.Module.compile``) keeps the state_dict keys: a checkpoint of a
    compiled model loads into an eager one and carries the delayed recipe's amax history."""
    compiled = _fp8_model("gpt", "delayed")
    compiled.compile(backend="aot_eager", fullgraph=True)
    for step in range(2):
        _sgd_step(compiled, compiled, step)
    eager = _fp8_model("gpt", "delayed")
    assert eager.state_dict().keys() == compiled.state_dict().keys()
    eager.load_state_dict(compiled.state_dict())
    history = eager.h[0].mlp.c_fc.input_scaling.amax_history
    assert int((history > 0).sum()) == 2 and torch.equal(history, compiled.h[0].mlp.c_fc.input_scaling.amax_history)


def test_fp8_primary_weights_trace_with_no_graph_break_and_compile_to_the_eager_gradients() -> None:
    torch.manual_seed(0)
    model = convert_to_fp8(_gpt(), fp8_weights=True)
    for m in model.modules():
        if getattr(m, "fp8_weight", False):
            m.release_high_precision_()
    breaks, reasons = _graph_breaks(model)
    assert breaks == 0, reasons
    compiled = copy.deepcopy(model)
    for m in compiled.modules():  # deepcopy materialises the handles: release them again
        if getattr(m, "fp8_weight", False):
            m.release_high_precision_()
    forward = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    idx, targets = _batch(1)
    _, loss_eager = model(idx, targets)
    _, loss_compiled = forward(idx, targets)
    loss_eager.backward()
    loss_compiled.backward()
    assert torch.allclose(loss_eager, loss_compiled, rtol=1e-6)
    for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name
