"""Accuracy of a precision change: paired training runs, the relative validation-loss gap.

    python bench/accuracy.py                          # llama_tiny, 3 seeds x 600 steps x 2 configs, ~10 min on 2 cores
    python bench/accuracy.py --steps 100 --seeds 0    # a quick look
    python bench/accuracy.py --dry-run                # 2 seeds x 4 steps: checks the script end to end

Each seed trains the baseline and the candidate from the same initial weights on the same data order
(``seed`` sets both), on one process, through the ``fp8train`` command (one subprocess per run, in a
temporary directory, no wandb). The figure is the validation loss at the last step (``eval_batches``
micro-batches of the fixed validation windows, the same for both runs); the table prints it per seed,
the relative gap (candidate - baseline) / baseline, and the mean gap over the seeds with its verdict
against the target (DeepSeek-V3's bar for FP8 training: a loss at most 0.25 % above the baseline's).
The bar bounds a loss increase; a candidate that is better by more than it still passes, and the
high-precision reference (``--reference``, default fp32; "-" to skip) shows which of the two is
closer to the loss that precision would reach: each run's gap to it is printed too.

Defaults: baseline ``precision=fp8_o2`` (FP8 GEMMs, FP8 gradients, Fp8AdamW with round-to-nearest
state, high-precision weights); candidate ``precision=fp8_o3`` at N = 1 (ZeRO-2 over one rank, FP8
primary weights) with stochastic rounding of Fp8AdamW's state.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _timing import verdict

REFERENCE = ["precision=fp32"]
BASELINE = ["precision=fp8_o2"]
CANDIDATE = ["precision=fp8_o3", "precision.optim_state.rounding=stochastic"]
TARGET_GAP_PERCENT = 0.25


def _final_val_loss(overrides: list[str], seed: int, steps: int, eval_batches: int, model: str) -> float:
    with tempfile.TemporaryDirectory(prefix="fp8train-accuracy-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fp8train", f"model={model}", f"seed={seed}", f"train.steps={steps}",
               f"train.eval_every={steps}", f"train.eval_batches={eval_batches}", f"checkpoint.every={steps}",
               "logging=wandb_disabled", "logging.progress=false", "monitor.every=0", "monitor.plots=false",
               f"run_dir={run_dir}", *overrides]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise SystemExit(f"bench/accuracy.py: run failed (exit {done.returncode}): {' '.join(overrides)} "
                             f"seed={seed}: {tail[0]}")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [r["val/loss"] for r in records if "val/loss" in r and r["step"] == steps]
        if not losses:
            raise SystemExit(f"bench/accuracy.py: no val/loss at step {steps} in {run_dir / 'metrics.jsonl'}")
        return losses[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_tiny")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-batches", type=int, default=32)
    parser.add_argument("--baseline", nargs="+", default=BASELINE, help="Hydra overrides of the baseline")
    parser.add_argument("--candidate", nargs="+", default=CANDIDATE, help="Hydra overrides of the candidate")
    parser.add_argument("--reference", nargs="+", default=REFERENCE,
                        help="Hydra overrides of the high-precision reference ('-': none)")
    parser.add_argument("--dry-run", action="store_true", help="2 seeds x 4 steps, 2 eval batches")
    args = parser.parse_args()
    if args.dry_run:
        args.steps, args.seeds, args.eval_batches = 4, [0, 1], 2
    reference = None if args.reference == ["-"] else args.reference
    print(f"model {args.model}, {args.steps} steps, seeds {args.seeds}, val loss at the last step "
          f"({args.eval_batches} eval batches)\nbaseline:  {' '.join(args.baseline)}\n"
          f"candidate: {' '.join(args.candidate)}\nreference: {' '.join(reference or ['none'])}\n")
    print(f"{'seed':>4} | {'reference':>9} | {'baseline':>9} | {'candidate':>9} | {'cand vs base %':>14} | "
          f"{'base vs ref %':>13} | {'cand vs ref %':>13}")
    gaps: dict[str, list[float]] = {"cand_base": [], "base_ref": [], "cand_ref": []}
    for seed in args.seeds:
        ref = _final_val_loss(reference, seed, args.steps, args.eval_batches, args.model) if reference else None
        base = _final_val_loss(args.baseline, seed, args.steps, args.eval_batches, args.model)
        cand = _final_val_loss(args.candidate, seed, args.steps, args.eval_batches, args.model)
        gaps["cand_base"].append(100.0 * (cand - base) / base)
        if ref is not None:
            gaps["base_ref"].append(100.0 * (base - ref) / ref)
            gaps["cand_ref"].append(100.0 * (cand - ref) / ref)
        ref_cols = (f"{ref:9.5f}", f"{gaps['base_ref'][-1]:+13.3f}", f"{gaps['cand_ref'][-1]:+13.3f}") if ref else \
            (f"{'-':>9}", f"{'-':>13}", f"{'-':>13}")
        print(f"{seed:>4} | {ref_cols[0]} | {base:9.5f} | {cand:9.5f} | {gaps['cand_base'][-1]:+14.3f} | "
              f"{ref_cols[1]} | {ref_cols[2]}", flush=True)
    means = {k: statistics.fmean(v) for k, v in gaps.items() if v}
    if reference:
        print(f"mean gap to the reference: baseline {means['base_ref']:+.3f} %, candidate {means['cand_ref']:+.3f} %")
    print(f"mean relative val-loss gap, candidate vs baseline: {means['cand_base']:+.3f} % (target <= "
          f"+{TARGET_GAP_PERCENT} %): {verdict(means['cand_base'], TARGET_GAP_PERCENT, at_most=True)}")


if __name__ == "__main__":
    main()
