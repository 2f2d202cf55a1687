"""When and how the loop samples FP8 scale dynamics (``monitor.every``; metrics in
fp8train.trainer.fp8_stats). A sampled step costs extra passes over each cast tensor, and one gather of
the optimizer-state scales; ``seconds`` accumulates that cost. The weight gradients' biases cost
nothing: they are the scales the strategy's FP8 gradient sync used (``grad_log2_scales()``)."""

from __future__ import annotations

import time
from typing import Any

import torch.distributed as dist
from torch import nn

from fp8train.trainer.fp8_stats import arm_cast_stats, cast_metrics, optimizer_metrics, wgrad_metrics
from fp8train.trainer.config import TrainConfig

__all__ = ["Fp8Sampler"]


class Fp8Sampler:
    def __init__(self, cfg: TrainConfig, model: nn.Module, strategy: Any) -> None:
        self.every, self.model, self.strategy = cfg.monitor.every, model, strategy
        self.active = False
        self.seconds = 0.0

    def start(self, step_number: int) -> None:
        """Call before the micro-steps of optimizer step ``step_number`` (1-based)."""
        self.active = self.every > 0 and step_number % self.every == 0
        if self.active:
            t0 = time.perf_counter()
            arm_cast_stats(self.model, True)
            self.seconds += time.perf_counter() - t0

    def finish(self) -> dict[str, float]:
        """After the optimizer step: every sampled metric of this step ({} when not sampled).
        Collective on sampled steps (the ranks' optimizer scales are merged: ZeRO shards them)."""
        if not self.active:
            return {}
        t0 = time.perf_counter()
        arm_cast_stats(self.model, False)
        metrics = {**wgrad_metrics(self.model, self.strategy.grad_log2_scales()), **cast_metrics(self.model)}
        optimizer = getattr(self.strategy, "local_optimizer", None)
        mine = optimizer_metrics(self.model, optimizer)
        gathered: list[dict[str, float] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        for part in gathered:
            metrics.update(part or {})
        self.active = False
        self.seconds += time.perf_counter() - t0
        return metrics
