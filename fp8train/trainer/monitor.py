"""What a run reports: a progress bar, console lines, ``metrics.jsonl`` and wandb (rank 0 only).

Metric names (wandb keys, JSON fields):
  train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/skipped_steps (overflow skips so
  far), train/comm_bytes (bytes this rank sent per step, mean over the interval), train/memory_mib
  (peak: CUDA allocated on GPU, process RSS on CPU), val/loss, train/monitor_s (seconds spent
  collecting FP8 statistics in the interval);
  fp8/{layer_type}/{role}/{stat}/L{layer}: FP8 scale dynamics every ``monitor.every`` steps (see
  fp8train.monitor_stats), with wandb histograms fp8_hist/{layer_type}/{role} across layers.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fp8train._atomic import atomic_write_text
from fp8train.trainer.config import LoggingConfig

__all__ = ["METRICS_FILE", "Monitor", "peak_memory_mib", "read_metrics"]

METRICS_FILE = "metrics.jsonl"


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``, in order."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class Monitor:
    """Rank 0 reports; other ranks' Monitors do nothing. ``start_step`` > 0 (a resumed run) drops
    metrics.jsonl records of later steps: they belong to the interrupted run's lost future."""

    def __init__(self, cfg: LoggingConfig, *, run_dir: Path, run_name: str, config: dict[str, Any],
                 is_main: bool, start_step: int, total_steps: int, wandb_id: str | None) -> None:
        self.cfg, self.active = cfg, is_main
        self.wandb_run, self.bar, self._file = None, None, None
        self.wandb_id = wandb_id
        if not is_main:
            return
        path = run_dir / METRICS_FILE
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= start_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a", buffering=1)  # line-buffered: every record reaches the OS at once
        if cfg.wandb != "disabled":
            import wandb  # lazily: importing wandb costs ~1 s

            self.wandb_run = wandb.init(project=cfg.project, name=run_name, id=wandb_id, resume="allow",
                                        dir=str(run_dir), mode=cfg.wandb, config=config,
                                        settings=wandb.Settings(silent=True, console="off"))
            self.wandb_id = self.wandb_run.id
        if cfg.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, desc=run_name)

    def advance(self, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def log(self, step: int, metrics: dict[str, float], *, console: bool = True) -> None:
        if not self.active:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if console:
            self.print(f"step {step:>6} | {_console_line(metrics)}")

    def log_histograms(self, step: int, values: dict[str, list[float]]) -> None:
        """wandb histograms (metrics.jsonl already holds the values they are drawn from)."""
        if self.wandb_run is not None and values:
            import wandb

            self.wandb_run.log({k: wandb.Histogram(v, num_bins=min(64, max(1, len(set(v)))))
                                for k, v in values.items()}, step=step)

    def print(self, line: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._file is not None:
            self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


_CONSOLE = {  # metric -> (label, format) for console lines; others (fp8/...) go to files only
    "train/loss": ("loss", "{:.4f}"), "val/loss": ("val loss", "{:.4f}"), "train/lr": ("lr", "{:.2e}"),
    "train/grad_norm": ("grad norm", "{:.3f}"), "train/tokens_per_s": ("tok/s", "{:,.0f}"),
    "train/skipped_steps": ("skipped", "{:d}"), "train/comm_bytes": ("comm B/step", "{:,d}"),
    "train/memory_mib": ("peak MiB", "{:,.0f}"), "train/epoch": ("epoch", "{:.3f}"),
}


def _console_line(metrics: dict[str, float]) -> str:
    return " | ".join(f"{label} {fmt.format(metrics[k])}" for k, (label, fmt) in _CONSOLE.items() if k in metrics)
