"""Learning rate per optimizer step: linear warm-up, then cosine decay to ``min_lr`` (or constant)."""

from __future__ import annotations

import math

from fp8train.trainer.config import OptimConfig

__all__ = ["lr_at"]


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    Warm-up: lr * (step + 1) / warmup_steps for the first warmup_steps steps (never 0: step 0
    already moves the weights). Cosine: from lr right after warm-up to min_lr at the last step.
    A pure function of the step, so a resumed run follows the same schedule with no state."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
