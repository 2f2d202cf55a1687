"""Where the convergence study's seed-to-seed spread comes from (docs/results.md): every finished run of
bench/study.py re-evaluated at its final checkpoint on the WHOLE validation split, and on its two halves.

    python bench/study_eval.py --corpus python        # after: python bench/study.py --corpora python ...
    python bench/study_eval.py --corpus shakespeare --out outputs/study

The study's loss is the mean over its first ``eval_batches`` x ``micro_batch_size`` windows of the split.
The paired gap to bf16 of one seed is then (the trajectories' own difference) + (the evaluation's sampling
noise, the windows chosen). Two disjoint halves A and B of the split give two estimates of the same
trajectory gap, so their difference is evaluation noise alone: SD(gap_A - gap_B) / 2 is the noise of the
whole-split gap (each half has twice its variance; the two are independent). What the whole split cannot
remove is the rest: the spread of the trajectories.

Printed per configuration: the gap to bf16 on the study's windows (as recorded; the re-evaluation must
reproduce it), on the whole split and per half, the seed-to-seed SD of each, the evaluation-noise SD and the
paired mean with its standard error on the whole split, against the study's 0.25 % bar.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import CONFIGS, TARGET_GAP_PERCENT, finished_run  # noqa: E402

from fp8train.trainer.build import build_model  # noqa: E402
from fp8train.trainer.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from fp8train.trainer.config import LauncherConfig, train_config_from_mapping  # noqa: E402
from fp8train.trainer.data import load_token_data  # noqa: E402
from fp8train.trainer.distributed import distributed_session  # noqa: E402
from fp8train.trainer.loop import validation_loss  # noqa: E402
from fp8train.trainer.precision import apply_precision  # noqa: E402
from fp8train.trainer.strategy import build_strategy  # noqa: E402

SPLITS = ("recorded", "study windows", "whole split", "half A", "half B")


def _batches(tokens, first: int, stop: int, *, seq_len: int, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Windows first..stop-1 of the split at stride seq_len (the trainer's validation windows), in
    batches of ``batch_size`` (the last one shorter)."""
    out = []
    for lo in range(first, stop, batch_size):
        starts = range(lo * seq_len, min(stop, lo + batch_size) * seq_len, seq_len)
        x = torch.stack([torch.from_numpy(tokens[s:s + seq_len].astype("int64")) for s in starts])
        y = torch.stack([torch.from_numpy(tokens[s + 1:s + seq_len + 1].astype("int64")) for s in starts])
        out.append((x, y))
    return out


def _mean_loss(model, batches, env, ctx_factory) -> float:
    """Mean per-token loss over ``batches``, weighting each batch by its windows (the last may be short)."""
    windows = [len(x) for x, _ in batches]
    return sum(validation_loss(model, [b], env, ctx_factory()) * n for b, n in zip(batches, windows)) / sum(windows)


def reevaluate(run_dir: Path, max_windows: int | None = None) -> dict[str, float]:
    """The run's final checkpoint evaluated on the study's windows, the whole split and its two halves
    (``max_windows``: only the split's first windows, for a quick look)."""
    cfg = train_config_from_mapping(yaml.safe_load((run_dir / "config.yaml").read_text()))
    with distributed_session(cfg.launcher) as env:
        data = load_token_data(cfg.data, seq_len=cfg.block_size, vocab_size=cfg.vocab_size)
        model = build_model(cfg.model, seed=cfg.seed, device=env.device)
        ctx_factory = apply_precision(model, cfg.precision, env.device)
        strategy = build_strategy(model, cfg, env)
        load_checkpoint(latest_checkpoint(run_dir), strategy=strategy, model=model, env=env)
        n_windows, batch = (len(data.val) - 1) // cfg.block_size, cfg.train.micro_batch_size
        n_windows = min(n_windows, max_windows or n_windows)
        study = min(n_windows, cfg.train.eval_batches * batch)  # validation_windows wraps beyond the split

        half = n_windows // 2
        # every window evaluated once: the study's windows lie in half A (``study`` <= half unless the
        # split is short), so the halves are built from per-range means weighted by their windows
        ranges = sorted({0, study, half, 2 * half})
        mean = {(lo, hi): _mean_loss(model, _batches(data.val, lo, hi, seq_len=cfg.block_size, batch_size=batch),
                                     env, ctx_factory) for lo, hi in zip(ranges, ranges[1:]) if hi > lo}

        def loss(first: int, stop: int) -> float:
            parts = [(m, hi - lo) for (lo, hi), m in mean.items() if first <= lo and hi <= stop]
            return sum(m * n for m, n in parts) / sum(n for _, n in parts)

        return {"study windows": loss(0, study), "whole split": loss(0, 2 * half),
                "half A": loss(0, half), "half B": loss(half, 2 * half)}


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def report(losses: dict[str, dict[int, dict[str, float]]], corpus: str) -> list[str]:
    """Markdown: per FP8 configuration, the gap to bf16 (%) per split, and the evaluation noise."""
    bf16 = losses["bf16"]
    seeds = sorted(bf16)
    lines = [f"### Re-evaluated gaps to bf16, {corpus}, seeds {', '.join(map(str, seeds))} (%; mean, seed-to-seed SD)",
             "", "| configuration | " + " | ".join(SPLITS) + " | eval-noise SD (whole split) | whole split: mean +- SE "
             f"| target (<= +{TARGET_GAP_PERCENT} %) |", "|---" * (len(SPLITS) + 4) + "|"]
    for name, per_seed in losses.items():
        if name in ("fp32", "bf16"):
            continue
        gaps = {s: [100 * (per_seed[k][s] / bf16[k][s] - 1) for k in seeds if k in per_seed] for s in SPLITS}
        noise = _sd([a - b for a, b in zip(gaps["half A"], gaps["half B"])]) / 2
        mean, se = statistics.fmean(gaps["whole split"]), _sd(gaps["whole split"]) / math.sqrt(len(gaps["whole split"]))
        cells = [f"{statistics.fmean(g):+.3f} ({_sd(g):.3f})" for g in gaps.values()]
        verdict = "pass" if mean <= TARGET_GAP_PERCENT else "FAIL"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {noise:.3f} | {mean:+.3f} +- {se:.3f} | {verdict} |")
    return lines


def _reevaluate_all(args: argparse.Namespace, losses: dict[str, dict[int, dict[str, float]]]) -> None:
    for name in CONFIGS:
        for seed in args.seeds:
            run_dir = args.out / "runs" / f"{args.model}-{args.corpus}-{name.replace(' ', '_')}-s{seed}"
            if (done := finished_run(run_dir, args.steps)) is None:
                raise SystemExit(f"bench/study_eval.py: {run_dir} has not finished {args.steps} steps; "
                                 "run bench/study.py first")
            losses.setdefault(name, {})[seed] = {"recorded": done["val_loss"], **reevaluate(run_dir)}
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.5f}" for k, v in losses[name][seed].items()),
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_tiny")
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/study"), help="bench/study.py's --out")
    args = parser.parse_args()
    losses: dict[str, dict[int, dict[str, float]]] = {}
    # one process group for every run: each reevaluate() reuses it rather than creating and destroying
    # its own (a fifth fresh gloo group in a row once hung in a futex wait here; 48 had not, another time)
    with distributed_session(LauncherConfig()):
        _reevaluate_all(args, losses)
    lines = report(losses, args.corpus)
    print("\n".join(lines))
    (args.out / f"reeval_{args.model}_{args.corpus}.json").write_text(json.dumps(losses, indent=1))


if __name__ == "__main__":
    main()
