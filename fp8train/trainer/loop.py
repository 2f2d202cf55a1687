"""The training loop: micro-steps with gradient accumulation, the optimizer step, evaluation,
logging and checkpoints. Setup (model, data, strategy, resume) is in ``fp8train.trainer.run``."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fp8train.trainer.data import WindowSampler, validation_windows
from fp8train.trainer.checkpoint import save_checkpoint
from fp8train.trainer.config import TrainConfig
from fp8train.trainer.distributed import DistEnv
from fp8train.trainer.fp8_stats import bias_histograms
from fp8train.trainer.faults import Faults
from fp8train.trainer.fp8_sampling import Fp8Sampler
from fp8train.trainer.run_log import Monitor, peak_memory_mib
from fp8train.trainer.schedule import lr_at

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


def run_loop(cfg: TrainConfig, *, model: nn.Module, strategy: Any, sampler: WindowSampler, val_tokens: np.ndarray,
             env: DistEnv, monitor: Monitor, state: LoopState, run_dir: Path,
             forward_ctx_factory: Any, trainer_state: Any) -> LoopState:
    """Train from ``state.step`` to ``cfg.train.steps``; returns the final state."""
    loop, log = cfg.train, cfg.logging
    accum, mb = loop.grad_accum_steps, loop.micro_batch_size
    tokens_per_step = mb * cfg.block_size * accum * env.world_size
    val_batches = validation_windows(val_tokens, seq_len=cfg.block_size, batch_size=mb, n_batches=loop.eval_batches,
                                     rank=env.rank, world_size=env.world_size)
    model.train()
    fp8 = Fp8Sampler(cfg, model, strategy)
    faults = Faults(cfg.faults, env.rank, resumed=state.step > 0)
    interval = {"loss": torch.zeros((), dtype=torch.float64, device=env.device), "steps": 0, "comm": 0,
                "norm": None, "t0": time.perf_counter()}
    end = loop.steps if loop.stop_after is None else loop.stop_after
    while state.step < end:
        strategy.set_lr(lr := lr_at(state.step, cfg.optim, loop.steps))
        step_loss = torch.zeros((), dtype=torch.float64, device=env.device)
        faults.at_step_start(state.step + 1)
        fp8.start(state.step + 1)
        for micro in range(accum):
            x, y = sampler.next_batch(batch_size=mb, rank=env.rank, world_size=env.world_size)
            with strategy.accumulating(sync=micro == accum - 1), forward_ctx_factory(), \
                    faults.activation_grad(model, state.step + 1, last_micro=micro == accum - 1):
                _, loss = strategy.module(x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True))
                if micro == accum - 1 and (factor := faults.loss_factor(state.step + 1)) != 1.0:
                    loss = loss * factor  # an injected overflow (faults.nonfinite_*)
                (loss / accum).backward()  # gradients accumulate in their own (high) precision
            step_loss += loss.detach().double()
        outcome = strategy.step()
        fp8_metrics = fp8.finish()
        strategy.zero_grad()
        state.step += 1
        state.tokens_seen += tokens_per_step
        state.skipped_steps += int(outcome.skipped)
        interval["loss"] += step_loss / accum
        interval["steps"] += 1
        interval["comm"] += outcome.comm_bytes
        interval["norm"] = outcome.grad_norm if outcome.grad_norm is not None else interval["norm"]
        done = state.step == end
        if state.step % log.log_every == 0 or done:
            state.last_train_loss = _mean_over_ranks(interval["loss"]) / interval["steps"]
            seconds = time.perf_counter() - interval["t0"]
            metrics = {"train/loss": state.last_train_loss, "train/lr": lr,
                       "train/tokens_per_s": interval["steps"] * tokens_per_step / max(seconds, 1e-9),
                       "train/skipped_steps": state.skipped_steps,
                       "train/comm_bytes": interval["comm"] // interval["steps"],
                       "train/memory_mib": peak_memory_mib(env.device), "train/epoch": sampler.epoch,
                       "train/monitor_s": fp8.seconds}
            if interval["norm"] is not None:
                metrics["train/grad_norm"] = interval["norm"]
            monitor.log(state.step, {**metrics, **fp8_metrics}, console=state.step % log.console_every == 0 or done)
            interval.update(loss=torch.zeros_like(interval["loss"]), steps=0, comm=0, t0=time.perf_counter())
            fp8.seconds = 0.0
        elif fp8_metrics:
            monitor.log(state.step, fp8_metrics, console=False)
        if fp8_metrics and cfg.monitor.histograms:
            monitor.log_histograms(state.step, bias_histograms(fp8_metrics))
        if (loop.eval_every and state.step % loop.eval_every == 0) or done:
            state.last_val_loss = validation_loss(model, val_batches, env, forward_ctx_factory())
            monitor.log(state.step, {"val/loss": state.last_val_loss})
        monitor.advance(state.last_train_loss)
        if (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or done:
            path = save_checkpoint(run_dir, state.step, strategy=strategy, model=model, env=env,
                                   trainer_state=trainer_state(state), keep_last=cfg.checkpoint.keep_last,
                                   before_commit=lambda: faults.in_checkpoint(state.step))
            monitor.print(f"checkpoint: {path}")
    return state
