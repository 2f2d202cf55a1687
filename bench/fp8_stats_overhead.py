"""Cost of FP8 scale-dynamics monitoring: training step time with ``monitor.every`` = 1 and the
default 10 against monitoring off, in one run of this script (same model, data and machine).

    python bench/fp8_stats_overhead.py                      # gpt_tiny, fp8_o2, 60 steps per run, 2 repeats
    python bench/fp8_stats_overhead.py --model llama_tiny --steps 100

Step time comes from the trainer's own tokens/s records (every 10 steps), skipping the first
interval (compilation and warm-up); each configuration runs ``--repeats`` times, interleaved, and
the median is reported. ``monitor s/step`` is the time the loop spent collecting statistics.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from fp8train.trainer.config import train_config_from_mapping
from fp8train.trainer.run import train
from fp8train.trainer.run_log import read_metrics


def _run(run_dir: Path, every: int, args: argparse.Namespace) -> tuple[float, float]:
    """(seconds per step, monitoring seconds per step) after the first logging interval."""
    overrides = [f"model={args.model}", f"precision={args.precision}", f"train.steps={args.steps}",
                 "logging=wandb_disabled", "logging.progress=false", "logging.log_every=10",
                 "logging.console_every=100000", "train.eval_every=0", "checkpoint.every=0", "monitor.plots=false",
                 f"monitor.every={every}", f"run_dir={run_dir}"]
    with initialize_config_module(config_module="fp8train.configs", version_base="1.3"):
        cfg = train_config_from_mapping(OmegaConf.to_container(compose("config", overrides=overrides), resolve=True))
    train(cfg)
    tokens_per_step = cfg.train.micro_batch_size * cfg.block_size * cfg.train.grad_accum_steps
    records = [r for r in read_metrics(run_dir) if "train/tokens_per_s" in r][1:]
    step_s = statistics.mean(tokens_per_step / r["train/tokens_per_s"] for r in records)
    monitor_s = sum(r["train/monitor_s"] for r in records) / (10 * len(records))
    return step_s, monitor_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt_tiny")
    parser.add_argument("--precision", default="fp8_o2")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    settings = (0, 10, 1)
    results: dict[int, list[tuple[float, float]]] = {e: [] for e in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for every in settings:
                results[every].append(_run(Path(tmp) / f"r{repeat}-e{every}", every, args))
    base = statistics.median(s for s, _ in results[0])
    print(f"\n{args.model}, {args.precision}, {args.steps} steps, median of {args.repeats}")
    print(f"{'monitor.every':>13} | {'s/step (ours)':>13} | {'s/step (off)':>12} | {'ratio':>6} | {'monitor s/step':>14}")
    for every in settings:
        step = statistics.median(s for s, _ in results[every])
        mon = statistics.median(m for _, m in results[every])
        label = "off" if every == 0 else str(every)
        print(f"{label:>13} | {step:13.4f} | {base:12.4f} | {step / base:6.3f} | {mon:14.4f}")


if __name__ == "__main__":
    main()
