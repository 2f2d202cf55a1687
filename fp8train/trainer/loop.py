"""The training loop: micro-steps with gradient accumulation, the optimizer step, evaluation,
logging and checkpoints. Setup (model, data, strategy, step hooks, resume) is in
``fp8train.trainer.run``; cross-cutting concerns (faults, FP8 statistics) are step hooks
(fp8train.trainer.hooks), not calls in the loop body."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fp8train.trainer.checkpoint import save_checkpoint
from fp8train.trainer.config import TrainConfig
from fp8train.trainer.data import WindowSampler, validation_windows
from fp8train.trainer.distributed import DistEnv
from fp8train.trainer.fp8_stats import bias_histograms
from fp8train.trainer.hooks import StepHook, StepHooks
from fp8train.trainer.run_log import RunLog, peak_memory_mib
from fp8train.trainer.schedule import lr_at
from fp8train.trainer.strategy import StepOutcome, Strategy

__all__ = ["LoopState", "run_loop", "validation_loss"]


@dataclass(kw_only=True, slots=True)
class LoopState:
    """What the loop carries between steps (and checkpoints, see ``trainer_state``)."""

    step: int = 0
    skipped_steps: int = 0
    tokens_seen: int = 0
    last_val_loss: float | None = None
    last_train_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def validation_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], env: DistEnv,
                    forward_ctx: AbstractContextManager[Any]) -> float:
    """Mean validation loss over every rank's batches (the same batches at every evaluation)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=env.device)
    with forward_ctx:
        for x, y in batches:
            total += model(x.to(env.device), y.to(env.device))[1].double()
    model.train(was_training)
    dist.all_reduce(total)
    return float(total) / (len(batches) * env.world_size)


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.double()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


@dataclass(kw_only=True, slots=True)
class _Interval:
    """What the loop sums between two log lines (``reset`` after each; ``grad_norm`` is kept: the
    last step that computed one, as a skipped step computes none)."""

    loss_sum: torch.Tensor  # float64 scalar: the sum over steps of each step's mean micro-step loss
    steps: int = 0
    tokens: int = 0  # the whole job's (all ranks), summed over the interval's steps
    comm_bytes: int = 0  # this rank's, summed over the interval's steps
    grad_norm: float | None = None
    t0: float = field(default_factory=time.perf_counter)  # seconds (perf_counter) at the interval start

    def add(self, mean_loss: torch.Tensor, outcome: StepOutcome, *, tokens: int) -> None:
        self.loss_sum += mean_loss
        self.steps += 1
        self.tokens += tokens
        self.comm_bytes += outcome.comm_bytes
        self.grad_norm = outcome.grad_norm if outcome.grad_norm is not None else self.grad_norm

    def reset(self) -> None:
        self.loss_sum = torch.zeros_like(self.loss_sum)
        self.steps, self.tokens, self.comm_bytes, self.t0 = 0, 0, 0, time.perf_counter()


def _micro_steps(cfg: TrainConfig, step: int, *, strategy: Strategy, sampler: WindowSampler, env: DistEnv,
                 hooks: StepHooks, forward_ctx_factory: Callable[[], AbstractContextManager[Any]]) -> torch.Tensor:
    """The forward and backward of optimizer step ``step``'s micro-steps; their loss sum (float64)."""
    accum, mb = cfg.train.grad_accum_steps, cfg.train.micro_batch_size
    step_loss = torch.zeros((), dtype=torch.float64, device=env.device)
    for micro in range(accum):
        last = micro == accum - 1
        x, y = sampler.next_batch(batch_size=mb, rank=env.rank, world_size=env.world_size)
        with strategy.accumulating(sync=last), forward_ctx_factory(), hooks.micro_step_context(step, micro, last=last):
            _, loss = strategy.module(x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True))
            loss = hooks.on_loss(step, micro, loss, last=last)
            strategy.backward(loss / accum)  # gradients accumulate in their own (high) precision
        step_loss += loss.detach().double()
    return step_loss


def _log_step(cfg: TrainConfig, state: LoopState, *, interval: _Interval, step_metrics: dict[str, float], lr: float,
              sampler: WindowSampler, env: DistEnv, run_log: RunLog, hooks: StepHooks, done: bool) -> None:
    """The log line (every ``logging.log_every`` steps and at the end) with the hooks' metrics of
    this step; on other steps only the hooks' metrics, if any (metrics.jsonl, no console line)."""
    log = cfg.logging
    if state.step % log.log_every == 0 or done:
        state.last_train_loss = _mean_over_ranks(interval.loss_sum) / interval.steps
        seconds = time.perf_counter() - interval.t0
        metrics = {"train/loss": state.last_train_loss, "train/lr": lr,
                   "train/tokens_per_s": interval.tokens / max(seconds, 1e-9),
                   "train/skipped_steps": state.skipped_steps,
                   "train/comm_bytes": interval.comm_bytes // interval.steps,
                   "train/memory_mib": peak_memory_mib(env.device), "train/epoch": sampler.epoch,
                   **hooks.interval_metrics()}
        if interval.grad_norm is not None:
            metrics["train/grad_norm"] = interval.grad_norm
        run_log.log(state.step, {**metrics, **step_metrics}, console=state.step % log.console_every == 0 or done)
        interval.reset()
    elif step_metrics:
        run_log.log(state.step, step_metrics, console=False)
    if step_metrics and cfg.monitor.histograms:  # wandb histograms of the scaling biases among them
        run_log.log_histograms(state.step, bias_histograms(step_metrics))


def run_loop(cfg: TrainConfig, *, model: nn.Module, strategy: Strategy, sampler: WindowSampler,
             val_tokens: np.ndarray, env: DistEnv, run_log: RunLog, state: LoopState, run_dir: Path,
             forward_ctx_factory: Callable[[], AbstractContextManager[Any]],
             trainer_state: Callable[[LoopState], dict[str, Any]], hooks: Sequence[StepHook]) -> LoopState:
    """Train from ``state.step`` to ``cfg.train.steps`` (or ``train.stop_after``); returns the final
    state. ``hooks`` run in list order at the points fp8train.trainer.hooks describes."""
    loop = cfg.train
    tokens_per_step = loop.micro_batch_size * cfg.block_size * loop.grad_accum_steps * env.world_size
    val_batches = validation_windows(val_tokens, seq_len=cfg.block_size, batch_size=loop.micro_batch_size,
                                     n_batches=loop.eval_batches, rank=env.rank, world_size=env.world_size)
    model.train()
    step_hooks = StepHooks(hooks)
    interval = _Interval(loss_sum=torch.zeros((), dtype=torch.float64, device=env.device))
    end = loop.steps if loop.stop_after is None else loop.stop_after
    while state.step < end:
        strategy.set_lr(lr := lr_at(state.step, cfg.optim, loop.steps))
        step = state.step + 1
        step_hooks.on_step_start(step)
        step_loss = _micro_steps(cfg, step, strategy=strategy, sampler=sampler, env=env, hooks=step_hooks,
                                 forward_ctx_factory=forward_ctx_factory)
        outcome = strategy.step()
        step_metrics = step_hooks.after_step(step, outcome)
        strategy.zero_grad()
        state.step = step
        state.tokens_seen += tokens_per_step
        state.skipped_steps += int(outcome.skipped)
        interval.add(step_loss / loop.grad_accum_steps, outcome, tokens=tokens_per_step)
        done = state.step == end
        _log_step(cfg, state, interval=interval, step_metrics=step_metrics, lr=lr, sampler=sampler, env=env,
                  run_log=run_log, hooks=step_hooks, done=done)
        if (loop.eval_every and state.step % loop.eval_every == 0) or done:
            state.last_val_loss = validation_loss(model, val_batches, env, forward_ctx_factory())
            run_log.log(state.step, {"val/loss": state.last_val_loss})
        run_log.advance(state.last_train_loss)
        if (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or done:
            path = save_checkpoint(run_dir, state.step, strategy=strategy, model=model, env=env,
                                   trainer_state=trainer_state(state), keep_last=cfg.checkpoint.keep_last,
                                   before_commit=lambda: step_hooks.before_commit(state.step))
            run_log.print(f"checkpoint: {path}")
    return state
