"""Llama model: shapes and init loss, causality, RoPE's relative-position property, RMSNorm against
a float64 reference, config validation, and FP8 conversion (which layers, state_dict, training,
logit SQNR against the high-precision model)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from fp8train import Fp8Config, Fp8Linear, convert_to_fp8
from fp8train.models import Llama, LlamaConfig
from fp8train.models.llama import RMSNorm, apply_rope, rope_tables, swiglu_hidden
from conftest import sqnr_db

# Small enough that no activation reaches FAST_CAST_MIN_NUMEL (no torch.compile start-up in tests).
SMALL = dict(block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)

SHAPE_CASES = [  # (case, config kwargs)
    ("multi-head", dict(n_layer=2, n_head=4, n_kv_head=4, n_embd=64)),
    ("grouped-query", dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64)),
    ("multi-query", dict(n_layer=1, n_head=8, n_kv_head=1, n_embd=64)),
    ("explicit ffn, small vocab", dict(vocab_size=64, n_layer=3, n_head=2, n_kv_head=1, n_embd=32,
                                       ffn_hidden=48)),
]


@pytest.mark.parametrize(("case", "kwargs"), SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_shapes_and_init_loss_is_near_uniform(case: str, kwargs: dict) -> None:
    cfg = LlamaConfig(block_size=32, **kwargs)
    model = Llama(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 20))
    logits, loss = model(idx, torch.randint(0, cfg.vocab_size, (3, 20)))
    assert logits.shape == (3, 20, cfg.vocab_size)
    assert model(idx)[1] is None
    # std-0.02 weights on unit-RMS features give logits of std 0.02 * sqrt(C) <= 0.16, i.e. a near
    # uniform softmax: loss = ln(V) + O(var / 2) ~ ln(V) + 0.01; 0.1 also covers the batch's noise.
    assert math.isfinite(loss.item())
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1, loss.item()


def test_ffn_default_is_swiglu_width_rounded_to_16() -> None:
    assert [swiglu_hidden(c) for c in (32, 64, 128, 4096)] == [96, 176, 352, 10928]
    assert LlamaConfig(n_embd=64, n_head=4, n_kv_head=4).ffn_hidden == 176
    assert LlamaConfig(n_embd=64, n_head=4, n_kv_head=4, ffn_hidden=48).ffn_hidden == 48


def test_too_long_sequence_is_rejected() -> None:
    model = Llama(LlamaConfig(**SMALL))
    with pytest.raises(ValueError, match="exceeds LlamaConfig.block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_causal_changing_token_t_leaves_earlier_logits_unchanged() -> None:
    model = Llama(LlamaConfig(**SMALL)).eval()
    idx = torch.randint(0, 256, (2, 24))
    t = 13
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 256
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    # Exact (tier 1): rows < t see the same inputs through row-wise GEMMs, and the masked scores
    # give exactly zero weight to later positions; any leak, however small, fails.
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.equal(a[:, t], b[:, t])  # and the change does reach position t


@pytest.mark.parametrize("shift", [1, 7, 50])
def test_rope_scores_depend_only_on_relative_position(shift: int) -> None:
    head_dim, seq_len = 32, 128
    cos, sin = rope_tables(seq_len, head_dim, 10000.0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    # the same q at every position and the same k at every position: (1, 1, T, D)
    q_rot = apply_rope(q.expand(1, 1, seq_len, head_dim), cos, sin)[0, 0]
    k_rot = apply_rope(k.expand(1, 1, seq_len, head_dim), cos, sin)[0, 0]
    scores = q_rot @ k_rot.T                                             # (T, T): score[i, j]
    n = seq_len - shift
    # Tolerance: the angles pos * freq are rounded in fp32, an error up to ~pos * 2**-24 rad
    # (~1e-5 at pos 127); the score moves by at most |q| |k| times that (~32 * 1e-5 = 3e-4 here).
    # Measured: <= 3.5e-5. A wrong pairing or frequency breaks the property by O(|q| |k|) = O(30).
    torch.testing.assert_close(scores[shift:, shift:], scores[:n, :n], rtol=0, atol=5e-4)
    # a rotation keeps the norm (to fp32 rounding: tier 3-like, a few ulps of |q| ~ 6)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm().expand(seq_len), rtol=1e-5, atol=0)


def test_rope_at_position_zero_is_identity_and_follows_input_dtype() -> None:
    cos, sin = rope_tables(4, 16, 10000.0)
    x = torch.randn(2, 3, 4, 16, dtype=torch.bfloat16)
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[:, :, 0], x[:, :, 0])  # cos 0 = 1, sin 0 = 0 exactly: tier 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_float64_reference(dtype: torch.dtype) -> None:
    dim, eps = 64, 1e-5
    norm = RMSNorm(dim, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim))
    x = (torch.randn(5, 7, dim) * 3).to(dtype)
    x64, w64 = x.double(), norm.weight.detach().double()
    ref = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps) * w64
    out = norm(x)
    assert out.dtype == torch.float32  # bf16 normalized value times the fp32 weight promotes
    if dtype == torch.float32:
        # fp32 vs fp64 on the same formula: a few fp32 ulps of the mean and the rsqrt
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    else:
        # the normalized value is rounded once to bf16 (8 bits, 2**-9 relative) before the weight
        torch.testing.assert_close(out.double(), ref, rtol=2 ** -8, atol=1e-6)


BAD_CONFIGS = [  # (case, kwargs, message fragment naming the field)
    ("zero vocab", dict(vocab_size=0), "LlamaConfig.vocab_size=0 is out of range"),
    ("float block size", dict(block_size=64.0), "LlamaConfig.block_size=64.0 has type float"),
    ("zero layers", dict(n_layer=0), "LlamaConfig.n_layer=0 is out of range"),
    ("bool heads", dict(n_head=True), "LlamaConfig.n_head=True has type bool"),
    ("zero kv heads", dict(n_kv_head=0), "LlamaConfig.n_kv_head=0 is out of range"),
    ("width not divisible", dict(n_embd=100, n_head=8, n_kv_head=8), "LlamaConfig.n_embd=100 must be divisible by"),
    ("odd head dim", dict(n_embd=36, n_head=4, n_kv_head=4), "LlamaConfig.n_embd=36 / n_head=4 (head dim) must be"),
    ("kv heads not dividing", dict(n_head=4, n_kv_head=3), "LlamaConfig.n_kv_head=3 must divide n_head=4"),
    ("zero ffn", dict(ffn_hidden=0), "LlamaConfig.ffn_hidden=0 is out of range"),
    ("negative theta", dict(rope_theta=-1.0), "LlamaConfig.rope_theta=-1.0 is out of range; allowed: finite"),
    ("inf theta", dict(rope_theta=math.inf), "LlamaConfig.rope_theta=inf is out of range"),
    ("string theta", dict(rope_theta="1e4"), "LlamaConfig.rope_theta='1e4' has type str"),
    ("zero eps", dict(norm_eps=0.0), "LlamaConfig.norm_eps=0.0 is out of range"),
    ("nan eps", dict(norm_eps=math.nan), "LlamaConfig.norm_eps=nan is out of range"),
]


@pytest.mark.parametrize(("case", "kwargs", "message"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_invalid_config_names_the_field_and_allowed_values(case: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        LlamaConfig(**kwargs)


PROJECTIONS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2", "mlp.w3")


def test_convert_swaps_every_projection_but_not_the_head_and_keeps_the_state_dict() -> None:
    source = Llama(LlamaConfig(**SMALL))
    saved = source.state_dict()
    assert not any("rope" in k for k in saved)  # RoPE tables are derived, not checkpointed
    model = convert_to_fp8(Llama(LlamaConfig(**SMALL)), config=Fp8Config())
    fp8 = sorted(n for n, m in model.named_modules() if isinstance(m, Fp8Linear))
    assert fp8 == sorted(f"layers.{i}.{p}" for i in range(SMALL["n_layer"]) for p in PROJECTIONS)
    assert type(model.lm_head) is torch.nn.Linear
    model.load_state_dict(saved, strict=True)
    for name, tensor in saved.items():  # lossless: tier 1
        assert torch.equal(model.state_dict()[name], tensor), name


def test_fp8_logits_are_close_to_high_precision_at_init() -> None:
    hp = Llama(LlamaConfig(**SMALL))
    fp8 = convert_to_fp8(Llama(LlamaConfig(**SMALL)), config=Fp8Config())
    fp8.load_state_dict(hp.state_dict())
    # The blocks' contribution to the residual stream, captured at the final norm's input minus the
    # embedding: every FP8 GEMM's error is in it, undiluted by the embedding or the hp lm_head.
    streams = {}
    for name, model in (("hp", hp), ("fp8", fp8)):
        model.norm.register_forward_hook(lambda m, args, out, name=name: streams.__setitem__(name, args[0]))
    idx = torch.randint(0, 256, (4, 32))
    with torch.no_grad():
        logits_hp, logits_fp8 = hp(idx)[0], fp8(idx)[0]
        emb = hp.tok_emb(idx)
    blocks_sqnr = sqnr_db(streams["hp"] - emb, streams["fp8"] - emb)
    logits_sqnr = sqnr_db(logits_hp, logits_fp8)
    # Floors: E4M3 keeps 3 mantissa bits, a relative rounding error of up to 2**-4 per element,
    # ~29 dB SQNR per quantized operand; a GEMM of two quantized operands is ~26 dB and each block
    # chains three (q/k/v -> wo, w1/w3 -> w2). 20 dB leaves room for that chaining; a wrong scale
    # or a transposed weight gives ~0 dB. Logits are higher: the embedding (exact) dominates the
    # stream at init and lm_head stays high precision, so 28 dB. Measured over seeds 0-5:
    # blocks 24.1-25.2 dB, logits 33.6-34.8 dB.
    assert blocks_sqnr >= 20.0, blocks_sqnr
    assert logits_sqnr >= 28.0, logits_sqnr


def test_fp8_converted_model_trains() -> None:
    model = convert_to_fp8(Llama(LlamaConfig(**SMALL)), config=Fp8Config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    x, y = torch.randint(0, 256, (2, 4, 32))  # one fixed batch of random tokens: memorize it
    losses = []
    for _ in range(8):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    # From ~ln(256) = 5.55; 8 AdamW steps at 3e-3 on one batch drop it by well over 0.5 when the
    # gradients flow through every FP8 layer. Measured over seeds 0-5: 5.55-5.57 -> 3.67-3.76.
    assert losses[-1] < losses[0] - 0.5, losses
