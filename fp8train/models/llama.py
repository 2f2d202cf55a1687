"""A Llama-style decoder: pre-RMSNorm blocks, rotary position embeddings (RoPE), causal
grouped-query attention, SwiGLU MLP, untied output head.

Linear layers are plain bias-free ``nn.Linear`` (convert_to_fp8 swaps them); names follow Meta's
Llama (``attn.wq/wk/wv/wo``, ``mlp.w1`` gate, ``mlp.w3`` up, ``mlp.w2`` down). ``lm_head`` is
registered last, so convert_to_fp8 finds it as the output head and keeps it in high precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fp8train._validate import check_int_range, check_type
from fp8train.convert import FP8_DIM_MULTIPLE

__all__ = [
    # model
    "Llama",
    "LlamaConfig",
    # components (public for tests and reuse)
    "RMSNorm",
    "apply_rope",
    "rope_tables",
    "swiglu_hidden",
]


def swiglu_hidden(n_embd: int) -> int:
    """SwiGLU width: 8/3 * n_embd (same parameter count as a 4x GELU MLP, since SwiGLU has three
    matrices), rounded up to a multiple of 16 so the FP8 GEMM dims stay divisible by 16."""
    hidden = -(-8 * n_embd // 3)  # ceil(8 * n_embd / 3) in exact integer arithmetic
    return -(-hidden // FP8_DIM_MULTIPLE) * FP8_DIM_MULTIPLE


def _check_positive_float(owner: str, field: str, value: object) -> None:
    check_type(owner, field, value, (int, float))
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}.{field}={value!r} is out of range; allowed: finite numbers > 0")


@dataclass(kw_only=True, slots=True)
class LlamaConfig:
    """vocab_size: tokens (256 for the byte-level tokenizer); block_size: max context in tokens
    (also the length of the RoPE tables); n_layer / n_head / n_embd: depth, query heads, width
    (n_embd divisible by n_head, head dim n_embd / n_head even for RoPE); n_kv_head: key/value
    heads for grouped-query attention (n_head divisible by n_kv_head; = n_head is plain multi-head
    attention, 1 is multi-query); ffn_hidden: SwiGLU width in features (None: ``swiglu_hidden``,
    8/3 * n_embd rounded up to a multiple of 16; resolved in __post_init__); rope_theta: RoPE base
    (wavelengths span 2*pi .. 2*pi*rope_theta tokens); norm_eps: RMSNorm epsilon added to the mean
    square."""

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 128
    ffn_hidden: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        owner = "LlamaConfig"
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            check_int_range(owner, name, getattr(self, name), 1)
        if self.n_embd % self.n_head:
            raise ValueError(f"{owner}.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"{owner}.n_embd={self.n_embd} / n_head={self.n_head} (head dim) must be "
                             "even: RoPE rotates pairs of features")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"{owner}.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.ffn_hidden is None:
            self.ffn_hidden = swiglu_hidden(self.n_embd)
        check_int_range(owner, "ffn_hidden", self.ffn_hidden, 1)
        _check_positive_float(owner, "rope_theta", self.rope_theta)
        _check_positive_float(owner, "norm_eps", self.norm_eps)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x**2) + eps) * weight, over the last dim."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Mean square and rsqrt in fp32: in bf16 the sum of squares over C features loses ~log2(C)
        # bits and eps=1e-5 is below bf16's resolution near 1. The normalized value is cast back to
        # x's dtype before the weight (as in Llama), so the output dtype follows the input.
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles pos * theta**(-2i/head_dim), each (seq_len, head_dim/2), fp32.

    fp32, not the model's dtype: the angle reaches seq_len radians, where bf16's 8 bits would put
    the absolute angle error near 1 rad at position ~256; in fp32 it stays ~seq_len * 2**-24.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by position: feature pairs (i, i + D/2) (the "rotate half" layout of
    GPT-NeoX / HF Llama) turn by angle t * freq_i. cos, sin: (T, D/2) from rope_tables.

    Computed in fp32 and cast back to x's dtype: a rotation must keep |x|, and q.k after rotation
    must depend only on the relative position; both hold to fp32 rounding, not to bf16's.
    """
    x1, x2 = x.float().chunk(2, dim=-1)                                 # (B, H, T, D/2) each
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, T, D)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape                                                   # (B, T, C)
        q = self.wq(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.wk(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA: query head h reads kv head h // (H / Hkv), as in Llama (repeat_interleave, not tile)
        group = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)        # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(b, t, c))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untied; last Linear
        # Non-persistent: derived from the config, so they stay out of the state_dict (checkpoints
        # keep their keys) and follow the model in .to(device). Note .to(dtype) would round them
        # too; fp8train trains with fp32 master weights, so they stay fp32.
        cos, sin = rope_tables(cfg.block_size, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)              # (block_size, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)              # (block_size, D/2)
        self.apply(self._init_weights)
        # GPT-2 / Llama: the two residual output projections per block add to the stream, so scale
        # their init by 1/sqrt(2L) to keep the residual variance at depth L independent of L.
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx: (B, T) token ids; returns logits (B, T, V) and, with targets, the mean CE loss."""
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds LlamaConfig.block_size={self.config.block_size}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]                      # (T, D/2)
        x = self.tok_emb(idx)                                                # (B, T, C)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))                                  # (B, T, V)
        loss = None
        if targets is not None:
            # fp32 cross-entropy: log-softmax over V in bf16 would lose the small logit differences
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
