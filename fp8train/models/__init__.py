"""Model definitions trained by fp8train (random init; nothing is downloaded).

``fp8train.models.hf`` imports transformers only when a model is built, so importing this package
does not import transformers.
"""

from fp8train.models.gpt import GPT, GPTConfig
from fp8train.models.hf import HfCausalLM, build_hf_causal_lm
from fp8train.models.llama import Llama, LlamaConfig

__all__ = [
    # nanoGPT-style: LayerNorm, learned positions, GELU MLP, tied head
    "GPT",
    "GPTConfig",
    # Llama-style: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, untied head
    "Llama",
    "LlamaConfig",
    # HF transformers causal LMs built from a config (optional extra fp8train[hf])
    "HfCausalLM",
    "build_hf_causal_lm",
]
