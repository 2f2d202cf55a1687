"""Model definitions trained by fp8train (random init; nothing is downloaded)."""

from fp8train.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
