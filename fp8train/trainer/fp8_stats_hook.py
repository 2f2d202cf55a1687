"""The step hook that samples FP8 scale dynamics every ``monitor.every`` steps (metrics in
fp8train.trainer.fp8_stats). A sampled step costs extra passes over each cast tensor, and one gather
of the optimizer-state scales; that cost is reported per log line as ``train/monitor_s``. The weight
gradients' biases cost nothing: they are the scales the strategy's FP8 gradient sync used
(``grad_log2_scales()``)."""

from __future__ import annotations

import time

import torch.distributed as dist
from torch import nn

from fp8train.trainer.fp8_stats import arm_cast_stats, cast_metrics, optimizer_metrics, wgrad_metrics
from fp8train.trainer.hooks import StepHook
from fp8train.trainer.strategy import StepOutcome, Strategy

__all__ = ["Fp8StatsHook"]


class Fp8StatsHook(StepHook):
    """every: sample optimizer steps ``every``, ``2 * every``, ... (0: never)."""

    def __init__(self, every: int, model: nn.Module, strategy: Strategy) -> None:
        self.every, self.model, self.strategy = every, model, strategy
        self.active = False
        self.seconds = 0.0  # spent sampling since the last log line

    def on_step_start(self, step: int) -> None:
        """Before the micro-steps of a sampled step: the FP8 casts start recording statistics."""
        self.active = self.every > 0 and step % self.every == 0
        if self.active:
            t0 = time.perf_counter()
            arm_cast_stats(self.model, True)
            self.seconds += time.perf_counter() - t0

    def after_step(self, step: int, outcome: StepOutcome) -> dict[str, float]:
        """After the optimizer step: every sampled metric of this step ({} when not sampled).
        Collective on sampled steps (the ranks' optimizer scales are merged: ZeRO shards them)."""
        if not self.active:
            return {}
        t0 = time.perf_counter()
        arm_cast_stats(self.model, False)
        metrics = {**wgrad_metrics(self.model, self.strategy.grad_log2_scales()), **cast_metrics(self.model)}
        mine = optimizer_metrics(self.model, self.strategy.local_optimizer)
        gathered: list[dict[str, float] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        for part in gathered:
            metrics.update(part or {})
        self.active = False
        self.seconds += time.perf_counter() - t0
        return metrics

    def interval_metrics(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, 0.0
        return {"train/monitor_s": seconds}
