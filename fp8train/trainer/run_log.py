"""What a run reports: a progress bar, console lines, ``metrics.jsonl`` and wandb (rank 0 only).

Metric names (wandb keys, JSON fields):
  train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/skipped_steps (overflow skips so
  far), train/comm_bytes (bytes this rank sent per step, mean over the interval), train/memory_mib
  (peak: CUDA allocated on GPU, process RSS on CPU), val/loss, train/monitor_s (seconds spent
  collecting FP8 statistics in the interval);
  fp8/{layer_type}/{role}/{stat}/L{layer}: FP8 scale dynamics every ``monitor.every`` steps (see
  fp8train.trainer.fp8_stats), with wandb histograms fp8_hist/{layer_type}/{role} across layers.
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
from fp8train.errors import ConfigError
from fp8train.trainer.config import LoggingConfig

__all__ = ["METRICS_FILE", "RunLog", "check_wandb_login", "peak_memory_mib", "read_metrics",
           "set_aside_later_metrics"]

METRICS_FILE = "metrics.jsonl"
_WANDB_ONLINE = "logging.wandb='online'"
_WANDB_FIX = "fix: `wandb login` or set WANDB_API_KEY, or use logging=wandb_offline and `wandb sync` later"


def check_wandb_login(cfg: LoggingConfig) -> None:
    """Online logging needs wandb credentials (WANDB_API_KEY, ~/.netrc, wandb's settings or an
    identity token). Looked up, not verified: no network call, no prompt, nothing written to the
    run. Call it before the run writes anything; ConfigError naming the fix when there are none."""
    if cfg.wandb != "online":
        return
    import inspect

    import wandb  # lazily: importing wandb costs ~1 s

    if "prompt" in inspect.signature(wandb.login).parameters:  # wandb >= 0.2x
        wandb.setup(settings=wandb.Settings(silent=True))  # the run's own setting; no "Loaded credentials" lines
        logged_in = wandb.login(verify=False, prompt=False)
    else:  # older wandb: the same lookup, through its internal API object
        logged_in = getattr(getattr(wandb, "api", None), "api_key", None) is not None
    if not logged_in:
        raise ConfigError(f"{_WANDB_ONLINE}: no wandb API key found (WANDB_API_KEY is unset and ~/.netrc has no "
                          f"entry for wandb); {_WANDB_FIX}")


def _init_wandb(cfg: LoggingConfig, *, run_dir: Path, run_name: str, config: dict[str, Any],
                wandb_id: str | None) -> Any:
    """``wandb.init``; online, any failure (no key, no network, a rejected key) becomes one
    ConfigError line naming the fix, after wandb's service is stopped (so that it writes no more
    files into run_dir, which the CLI then removes)."""
    import wandb  # lazily: importing wandb costs ~1 s

    try:
        return wandb.init(project=cfg.project, name=run_name, id=wandb_id, resume="allow", dir=str(run_dir),
                          mode=cfg.wandb, config=config, settings=wandb.Settings(silent=True, console="off"))
    except Exception as e:
        if cfg.wandb != "online":
            raise
        try:
            wandb.teardown()
        except Exception:  # the original failure is the one to report
            pass
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"{_WANDB_ONLINE}: wandb.init failed ({cause}); {_WANDB_FIX}") from None


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``, in order."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def set_aside_later_metrics(run_dir: Path, step: int, tag: str) -> Path | None:
    """Keep in metrics.jsonl the records of steps <= ``step``; move later ones (an abandoned
    trajectory, or an interrupted run's lost future), as written, to ``metrics.abandoned-<tag>.jsonl``
    (the copy is written before metrics.jsonl is rewritten: a crash may duplicate, never lose).
    A line that is not JSON (a torn write) is moved too. Returns that file, or None if nothing moved."""
    path = run_dir / METRICS_FILE
    keep: list[str] = []
    drop: list[str] = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            later = json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError):
            later = bool(line.strip())
        (drop if later else keep).append(line + "\n")
    if not drop:
        return None
    aside = run_dir / f"metrics.abandoned-{tag}.jsonl"
    atomic_write_text(aside, "".join(drop))
    atomic_write_text(path, "".join(line for line in keep if line.strip()))
    return aside


class RunLog:
    """Rank 0 reports; other ranks' RunLogs do nothing. metrics.jsonl is opened by ``open_metrics``,
    once nothing can refuse the run any more."""

    def __init__(self, cfg: LoggingConfig, *, run_dir: Path, run_name: str, config: dict[str, Any],
                 is_main: bool, start_step: int, total_steps: int, wandb_id: str | None) -> None:
        self.cfg, self.active = cfg, is_main
        self.wandb_run, self.bar, self._file = None, None, None
        self.wandb_id = wandb_id
        if not is_main:
            return
        self._run_dir, self._start_step = run_dir, start_step  # metrics.jsonl: see open_metrics
        if cfg.wandb != "disabled":
            self.wandb_run = _init_wandb(cfg, run_dir=run_dir, run_name=run_name, config=config, wandb_id=wandb_id)
            self.wandb_id = self.wandb_run.id
        if cfg.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, desc=run_name)

    def open_metrics(self, tag: str) -> Path | None:
        """Open metrics.jsonl for appending, after moving records of steps later than ``start_step``
        (``set_aside_later_metrics``); returns where they went (None: nothing moved, or not rank 0)."""
        if not self.active:
            return None
        aside = set_aside_later_metrics(self._run_dir, self._start_step, tag)
        self._file = open(self._run_dir / METRICS_FILE, "a", buffering=1)  # line-buffered: each record reaches the OS
        return aside

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
