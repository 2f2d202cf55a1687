"""HF transformers causal LMs through fp8train: building from a dotted config path (random init, no
network), the (logits, loss) interface against F.cross_entropy, FP8 conversion of Llama-style models
(head kept), a short FP8 training run, GPT-2's Conv1D warning, and config errors naming the field."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from fp8train import Fp8Config, Fp8Linear, convert_to_fp8  # noqa: E402
from fp8train.trainer.bf16 import Bf16Linear, convert_to_bf16_emulated  # noqa: E402
from fp8train.models import HfCausalLM, build_hf_causal_lm  # noqa: E402
from synthetic import MarkovTokens  # noqa: E402

VOCAB, BLOCK = 256, 64
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
# nn.Linear projections of one HF Llama-style decoder layer, in registration order
PROJECTIONS = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
    [f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any connection attempt (even one that transformers catches and turns into a fallback) fails
    the test. HF_HUB_OFFLINE=1 as well, although huggingface_hub reads it at import (already done
    by importorskip): the socket guard is the real check."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access refused by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert not attempts, f"network access attempted: {attempts}"


def _tiny(config_class: str = "transformers.LlamaConfig", **extra) -> HfCausalLM:
    return build_hf_causal_lm(config_class, {**TINY, **extra}, vocab_size=VOCAB, block_size=BLOCK)


def test_tiny_llama_builds_with_the_data_sizes_in_fp32() -> None:
    model = _tiny()
    cfg = model.hf_model.config
    assert isinstance(model, HfCausalLM) and type(model.hf_model).__name__ == "LlamaForCausalLM"
    assert (cfg.vocab_size, cfg.max_position_embeddings, model.block_size) == (VOCAB, BLOCK, BLOCK)
    assert cfg._attn_implementation == "sdpa" and cfg.use_cache is False
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_forward_returns_logits_and_the_unshifted_fp32_cross_entropy() -> None:
    model = _tiny()
    idx, targets = torch.randint(0, VOCAB, (2, BLOCK)), torch.randint(0, VOCAB, (2, BLOCK))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, BLOCK, VOCAB)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # Bit-exact (tier 1): the same op on the same logits. Equality with the unshifted loss also
    # shows that HF's label shift is not applied (a shifted loss drops a position per row).
    expected = F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert model(idx)[1] is None
    with pytest.raises(ValueError, match="sequence length 65 exceeds the HF model's block_size=64"):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))


LLAMA_STYLE = [  # (config class, extra kwargs): architectures whose projections are all nn.Linear
    ("transformers.LlamaConfig", dict(num_key_value_heads=2)),
    ("transformers.MistralConfig", dict(num_key_value_heads=2)),
    ("transformers.Qwen2Config", dict(num_key_value_heads=2)),  # q/k/v with bias
]


@pytest.mark.parametrize(("config_class", "extra"), LLAMA_STYLE, ids=[c[0].split(".")[1] for c in LLAMA_STYLE])
def test_convert_to_fp8_swaps_the_projections_and_keeps_lm_head(config_class: str, extra: dict) -> None:
    model = _tiny(config_class, **extra)
    keys_before = list(model.state_dict().keys())
    # convert_to_fp8 finds the head as the last nn.Linear registered: true for these models
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1] == "hf_model.lm_head"
    convert_to_fp8(model)
    fp8 = [n for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
    assert fp8 == [f"hf_model.model.layers.{i}.{proj}" for i in range(2) for proj in PROJECTIONS]
    assert type(model.hf_model.lm_head) is nn.Linear
    assert [k for k in model.state_dict() if "_scaling." not in k] == keys_before
    logits, loss = model(torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16)))
    assert logits.shape == (2, 16, VOCAB) and torch.isfinite(loss)


def test_convert_to_bf16_emulated_covers_every_linear_including_lm_head() -> None:
    model = convert_to_bf16_emulated(_tiny())
    assert all(isinstance(m, Bf16Linear) for m in model.modules() if isinstance(m, nn.Linear))
    assert isinstance(model.hf_model.lm_head, Bf16Linear)


def test_fp8_training_reduces_the_loss() -> None:
    torch.manual_seed(0)
    model = convert_to_fp8(_tiny(), config=Fp8Config(recipe="current", backend="emulated"))
    data = MarkovTokens(VOCAB, BLOCK, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(20):
        x, y = data.batch(4, gen)  # (4, 64): activations stay under FAST_CAST_MIN_NUMEL (no compile)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # From ln(256) = 5.55 at init; 20 steps at lr 3e-3 learn the chain's unigram statistics at
    # least (measured: -0.79 nats, 3-step means). 0.5 nats is well above the batch noise (~0.1).
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


def test_gpt2_builds_and_warns_that_the_bf16_emulation_keeps_its_conv1d() -> None:
    with pytest.warns(UserWarning, match="Conv1D layers .* convert_to_bf16_emulated .* do not convert"):
        model = build_hf_causal_lm("transformers.GPT2Config", dict(n_embd=64, n_layer=2, n_head=4),
                                   vocab_size=VOCAB, block_size=BLOCK)
    assert (model.hf_model.config.vocab_size, model.hf_model.config.n_positions) == (VOCAB, BLOCK)
    convert_to_fp8(model)
    # the 8 Conv1D projections become FP8 (tests/test_hf_conv1d.py); the (tied) lm_head is skipped
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 8
    logits, _ = model(torch.randint(0, VOCAB, (1, 8)))
    assert logits.shape == (1, 8, VOCAB)


def test_user_sizes_at_least_the_datas_are_kept() -> None:
    model = _tiny(vocab_size=320, max_position_embeddings=128)
    assert (model.hf_model.config.vocab_size, model.hf_model.config.max_position_embeddings) == (320, 128)


BAD_CONFIG_CLASSES = [  # (case, config_class, message fragment)
    ("no dot", "LlamaConfig", "is not a dotted path"),
    ("misspelt class", "transformers.LlamaConfg", "cannot be imported"),
    ("missing module", "no_such_package.LlamaConfig", "cannot be imported"),
    ("a model, not a config", "transformers.LlamaForCausalLM",
     "is class LlamaForCausalLM, not a transformers PretrainedConfig"),
    ("not a class", "os.path.join", "is a function, not a transformers PretrainedConfig"),
    ("not a string", 42, "is not a dotted path"),
    ("config without a causal LM", "transformers.T5Config", "transformers has no causal-LM model for T5Config"),
]


@pytest.mark.parametrize(("case", "config_class", "message"), BAD_CONFIG_CLASSES,
                         ids=[c[0] for c in BAD_CONFIG_CLASSES])
def test_bad_config_class_is_a_one_line_error_naming_the_field(case: str, config_class, message: str) -> None:
    with pytest.raises(ValueError, match=f"model.config._target_={config_class!r}") as err:
        build_hf_causal_lm(config_class, TINY, vocab_size=VOCAB, block_size=BLOCK)
    assert message in str(err.value) and "\n" not in str(err.value)


BAD_KWARGS = [  # (case, extra kwargs, message fragment)
    ("vocab below the data's", dict(vocab_size=100),
     "model.config.vocab_size=100 is smaller than the data's vocab_size=256"),
    ("positions below block", dict(max_position_embeddings=32),
     "model.config.max_position_embeddings=32 is smaller than the data's block_size=64"),
    ("dtype", dict(dtype="bfloat16"), "model.config.dtype='bfloat16' is not allowed"),
    ("torch_dtype", dict(torch_dtype="float16"), "model.config.torch_dtype='float16' is not allowed"),
]


@pytest.mark.parametrize(("case", "extra", "message"), BAD_KWARGS, ids=[c[0] for c in BAD_KWARGS])
def test_bad_config_kwargs_name_the_field(case: str, extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _tiny(**extra)


def test_missing_transformers_is_a_one_line_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"pip install 'fp8train\[hf\]'") as err:
        _tiny()
    assert "\n" not in str(err.value)


def test_importing_fp8train_models_does_not_import_transformers() -> None:
    code = "import sys, fp8train, fp8train.models, fp8train.models.hf; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
