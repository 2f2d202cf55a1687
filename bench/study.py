"""Convergence study of FP8 scale granularities: paired runs against fp32 and bf16 (docs/results.md).

    python bench/study.py                                 # the full grid (hours on 2 CPU cores)
    python bench/study.py --models llama_tiny --corpora shakespeare --steps 300 --seeds 0 1
    python bench/study.py --dry-run                       # every configuration, 4 steps, 1 seed
    python bench/study.py --resume                        # keep the runs that finished, train the rest

Every (model, corpus, seed) trains each configuration from the same initial weights on the same data
order (``seed`` sets both), on one process, through the ``fp8train`` command, so the gap between two
configurations of one seed is the precision's alone. Reported per configuration: the final validation
loss, the relative gap to fp32 and to bf16 per seed (mean and spread = min..max over the seeds), the
tokens/s of the run (on this CPU the FP8 GEMMs are an fp32 EMULATION: a cost figure, not FP8's speed),
and the verdict against the target: every FP8 configuration within 0.25 % of bf16 at the paired mean
(DeepSeek-V3's bar; a loss increase is bounded, a decrease passes). Loss curves (seed 0) go to
``--out``/loss_<model>_<corpus>.png, and for a configuration that misses, its per-layer scaling-bias
plots (the trainer's own, seed 0).

Corpora: ``shakespeare`` (the bundled one) and ``python``: source text of a few Python standard-library
packages, read from this interpreter's installation (no network; byte-level tokens like the bundled
corpus), a second domain with another character distribution (code, long identifiers, indentation).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import verdict  # noqa: E402

from fp8train.trainer.plots import plot_losses  # noqa: E402
from fp8train.trainer.run_log import read_metrics  # noqa: E402

CONFIGS = {  # name -> Hydra overrides
    "fp32": ["precision=fp32"],
    "bf16": ["precision=bf16"],
    "fp8_o2 tensor": ["precision=fp8_o2"],
    "fp8_o2 rowwise": ["precision=fp8_o2", "precision.fp8.granularity=rowwise"],
    "fp8_o2 block": ["precision=fp8_o2", "precision.fp8.granularity=block"],
    "fp8_o2 mx": ["precision=fp8_o2", "precision.fp8.granularity=mx"],
    "fp8_o3": ["precision=fp8_o3"],  # FP8 primary weights + stochastic rounding of Fp8AdamW's state
    "fp8_o3 block": ["precision=fp8_o3", "precision.fp8.granularity=block"],  # ... stored with 128x128 scales
}
TARGET_GAP_PERCENT = 0.25
PYTHON_PACKAGES = ("email", "json", "http", "logging", "asyncio", "unittest")  # ~2 MB of source


def python_corpus(path: Path) -> Path:
    """The ``python`` corpus: the .py files of PYTHON_PACKAGES in sorted order, written once."""
    if not path.exists():
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(f for pkg in PYTHON_PACKAGES for f in (root / pkg).rglob("*.py"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files))
    return path


def run(name: str, overrides: list[str], *, model: str, corpus: Path | None, seed: int, steps: int,
        eval_batches: int, run_dir: Path) -> dict:
    """One training run; its final val loss, mean tokens/s and metric records."""
    data = ["data=custom", f"data.path={corpus}"] if corpus is not None else []
    cmd = [sys.executable, "-m", "fp8train", f"model={model}", f"seed={seed}", f"train.steps={steps}",
           f"train.eval_every={max(steps // 5, 1)}", f"train.eval_batches={eval_batches}", f"checkpoint.every={steps}",
           "logging=wandb_disabled", "logging.progress=false", "logging.log_every=10", "monitor.every=50",
           f"run_dir={run_dir}", *data, *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"bench/study.py: {name} seed={seed} failed (exit {done.returncode}): {tail[0]}")
    records = read_metrics(run_dir)
    val = [r["val/loss"] for r in records if "val/loss" in r and r["step"] == steps]
    speeds = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r]
    return {"val_loss": val[-1], "tokens_per_s": statistics.fmean(speeds[1:] or speeds), "records": records}


def finished_run(run_dir: Path, steps: int) -> dict | None:
    """A finished run's result from its directory (``--report-only``), or None if it did not finish."""
    if not (run_dir / "metrics.jsonl").exists():
        return None
    records = read_metrics(run_dir)
    val = [r["val/loss"] for r in records if "val/loss" in r and r["step"] == steps]
    speeds = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r]
    return {"val_loss": val[-1], "tokens_per_s": statistics.fmean(speeds[1:] or speeds), "records": records} \
        if val else None


def _gap(a: float, b: float) -> float:
    return 100.0 * (a - b) / b


def report(results: dict, seeds: list[int]) -> list[str]:
    """Markdown tables, one per (model, corpus): the paired gaps to fp32 and bf16 and the verdicts."""
    lines = []
    for (model, corpus), by_config in results.items():
        by_config = {name: per for name, per in by_config.items() if all(s in per for s in seeds)}  # paired only
        lines += [f"### {model} on {corpus}", "",
                  "| configuration | val loss (mean) | gap to fp32 %, mean [min, max] | gap to bf16 %, mean [min, max] "
                  "| tokens/s (CPU, emulated FP8) | target (<= +0.25 % vs bf16) |", "|---|---|---|---|---|---|"]
        for name, per_seed in by_config.items():
            losses = [per_seed[s]["val_loss"] for s in seeds]
            cells = []
            for ref in ("fp32", "bf16"):
                gaps = [_gap(per_seed[s]["val_loss"], by_config[ref][s]["val_loss"]) for s in seeds] \
                    if ref in by_config else []
                cells.append(f"{statistics.fmean(gaps):+.3f} [{min(gaps):+.3f}, {max(gaps):+.3f}]" if gaps else "-")
            to_bf16 = [_gap(per_seed[s]["val_loss"], by_config["bf16"][s]["val_loss"]) for s in seeds] \
                if "bf16" in by_config and name.startswith("fp8") else None
            target = verdict(statistics.fmean(to_bf16), TARGET_GAP_PERCENT, at_most=True) if to_bf16 else "-"
            speed = statistics.fmean(per_seed[s]["tokens_per_s"] for s in seeds)
            lines.append(f"| {name} | {statistics.fmean(losses):.5f} | {cells[0]} | {cells[1]} | {speed:,.0f} | {target} |")
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama_tiny,gpt_small")
    parser.add_argument("--corpora", default="shakespeare,python")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-batches", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("outputs/study"), help="runs, results.json, plots")
    parser.add_argument("--dry-run", action="store_true", help="4 steps, seed 0, 2 eval batches, llama_tiny")
    parser.add_argument("--resume", action="store_true",
                        help="keep every run under --out that finished --steps (an interrupted grid goes on where it stopped)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tables and plots from the runs already finished under --out")
    args = parser.parse_args()
    if args.dry_run:
        args.models, args.steps, args.seeds, args.eval_batches = "llama_tiny", 4, [0], 2
    configs = {name: CONFIGS[name] for name in args.configs.split(",")}
    results: dict = {}
    for model in args.models.split(","):
        for corpus_name in args.corpora.split(","):
            corpus = python_corpus(args.out / "python_corpus.txt") if corpus_name == "python" else None
            by_config = results.setdefault((model, corpus_name), {})
            for name, overrides in configs.items():
                for seed in args.seeds:
                    run_dir = args.out / "runs" / f"{model}-{corpus_name}-{name.replace(' ', '_')}-s{seed}"
                    if args.report_only:
                        if (done := finished_run(run_dir, args.steps)) is not None:
                            by_config.setdefault(name, {})[seed] = done
                        continue
                    if args.resume and (done := finished_run(run_dir, args.steps)) is not None:
                        by_config.setdefault(name, {})[seed] = done
                        print(f"{model} {corpus_name} {name} seed {seed}: kept (finished)", flush=True)
                        continue
                    shutil.rmtree(run_dir, ignore_errors=True)
                    by_config.setdefault(name, {})[seed] = run(name, overrides, model=model, corpus=corpus, seed=seed,
                                                               steps=args.steps, eval_batches=args.eval_batches,
                                                               run_dir=run_dir)
                    print(f"{model} {corpus_name} {name} seed {seed}: val loss "
                          f"{by_config[name][seed]['val_loss']:.5f}", flush=True)
            plot_losses({name: per_seed[args.seeds[0]]["records"] for name, per_seed in by_config.items()
                         if args.seeds[0] in per_seed}, args.out / f"loss_{model}_{corpus_name}.png")
            for name in (n for n in configs if n.startswith("fp8")):  # the per-layer scale plots (seed 0)
                plots = args.out / "runs" / f"{model}-{corpus_name}-{name.replace(' ', '_')}-s{args.seeds[0]}" / "plots"
                if plots.is_dir():
                    shutil.copytree(plots, args.out / "scales" / f"{model}_{corpus_name}_{name.replace(' ', '_')}",
                                    dirs_exist_ok=True)
    lines = report(results, args.seeds)
    print("\n".join(lines))
    (args.out / "results.md").write_text("\n".join(lines))
    (args.out / "results.json").write_text(json.dumps(
        {f"{m}/{c}": {n: {s: {k: v for k, v in r.items() if k != "records"} for s, r in per.items()}
                      for n, per in by.items()} for (m, c), by in results.items()}, indent=1))


if __name__ == "__main__":
    main()
