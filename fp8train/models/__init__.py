"""Model definitions trained by fp8train (random init; nothing is downloaded)."""

from fp8train.models.gpt import GPT, GPTConfig
from fp8train.models.llama import Llama, LlamaConfig

__all__ = [
    # nanoGPT-style: LayerNorm, learned positions, GELU MLP, tied head
    "GPT",
    "GPTConfig",
    # Llama-style: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, untied head
    "Llama",
    "LlamaConfig",
]
