"""Synthetic token streams with learnable structure, for tests and demos that need no data files.

Each sequence follows a fixed random first-order Markov chain over the vocabulary with a peaked
transition table, so a model can learn it (loss falls from ln(V) towards the chain's entropy rate).
"""

from __future__ import annotations

import torch

__all__ = ["MarkovTokens"]


class MarkovTokens:
    """Deterministic batches from a Markov chain fixed by ``seed``.

    vocab_size: tokens; seq_len: tokens per sample (inputs; targets are shifted by one);
    concentration: temperature of the transition logits (higher = more predictable).
    """

    def __init__(self, vocab_size: int, seq_len: int, *, seed: int = 0, concentration: float = 3.0) -> None:
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(vocab_size, vocab_size, generator=gen) * concentration
        self.transition = torch.softmax(logits, dim=-1)                     # (V, V) rows sum to 1
        self.vocab_size, self.seq_len = vocab_size, seq_len

    def batch(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, T) int64."""
        tokens = torch.empty(batch_size, self.seq_len + 1, dtype=torch.int64)
        tokens[:, 0] = torch.randint(self.vocab_size, (batch_size,), generator=gen)
        for t in range(self.seq_len):
            tokens[:, t + 1] = torch.multinomial(self.transition[tokens[:, t]], 1, generator=gen).squeeze(1)
        return tokens[:, :-1], tokens[:, 1:]

    def entropy_rate(self) -> float:
        """Per-token entropy (nats) under the uniform start: a floor for the achievable loss."""
        h_rows = -(self.transition * self.transition.clamp_min(1e-30).log()).sum(-1)
        return float(h_rows.mean())
