"""PNG plots of FP8 scale dynamics and losses from runs' ``metrics.jsonl`` (no wandb needed).

    fp8train-plot RUN_DIR [RUN_DIR ...] [--out DIR]

Writes into ``--out`` (default: the first run's ``plots/``):
  scaling_bias_by_layer.png     the last sampled step: scaling bias per decoder layer and linear type
                                for weights, activations (inputs), output gradients and weight
                                gradients (the Graphcore paper's Figure 6, arXiv 2309.17224), first run only;
  scaling_bias_over_training.png  the same biases against the step, one line per layer, first run;
  loss.png                      train and validation loss of every run given, side by side.
The trainer writes them into ``run_dir/plots`` at the end of a run (``monitor.plots``).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fp8train._atomic import atomic_write  # noqa: E402
from fp8train.trainer.fp8_stats import parse_key  # noqa: E402
from fp8train.trainer.run_log import METRICS_FILE, read_metrics  # noqa: E402

__all__ = ["main", "write_run_plots"]

_PANELS = (("weight", "weights"), ("input", "activations (inputs)"), ("grad_output", "output gradients"),
           ("wgrad", "weight gradients"))


def _layer_number(layer: str) -> int:
    return int(layer[1:]) if layer.startswith("L") else -1


def _biases(records: list[dict]) -> dict[tuple[str, str, str], list[tuple[int, float]]]:
    """{(role, layer_type, layer): [(step, bias), ...]} of every sampled scaling bias."""
    series: dict[tuple[str, str, str], list[tuple[int, float]]] = defaultdict(list)
    for record in records:
        for key, value in record.items():
            parsed = parse_key(key)
            if parsed is not None and parsed[2] == "scaling_bias":
                layer_type, role, _, layer = parsed
                series[(role, layer_type, layer)].append((record["step"], value))
    return series


def _save(fig: plt.Figure, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_bias_by_layer(records: list[dict], path: Path, title: str) -> Path | None:
    series = _biases(records)
    if not series:
        return None
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(4.2 * len(_PANELS), 3.6), sharey=False)
    for ax, (role, label) in zip(axes, _PANELS):
        by_type: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for (r, layer_type, layer), points in series.items():
            if r == role:
                by_type[layer_type].append((_layer_number(layer), points[-1][1]))
        for layer_type, points in sorted(by_type.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=layer_type)
        ax.set_title(label)
        ax.set_xlabel("decoder layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # biases are integers
        ax.grid(alpha=0.3)
        if by_type:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("scaling bias (log2 scale)")
    last = max(p[-1][0] for p in series.values())
    fig.suptitle(f"{title}: scaling bias per layer at step {last}")
    return _save(fig, path)


def plot_bias_over_training(records: list[dict], path: Path, title: str) -> Path | None:
    series = _biases(records)
    if not series:
        return None
    types = sorted({t for _, t, _ in series})
    colors = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(types)}
    fig, axes = plt.subplots(len(_PANELS), 1, figsize=(8, 2.6 * len(_PANELS)), sharex=True)
    for ax, (role, label) in zip(axes, _PANELS):
        for (r, layer_type, layer), points in sorted(series.items()):
            if r == role:
                ax.plot([p[0] for p in points], [p[1] for p in points], color=colors[layer_type], alpha=0.8,
                        label=f"{layer_type} {layer}", drawstyle="steps-post")
        ax.set_ylabel(f"{label}\nbias")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[t], label=t) for t in types]
    axes[0].legend(handles=handles, fontsize=7, ncol=min(4, len(types)))
    axes[-1].set_xlabel("step")
    fig.suptitle(f"{title}: scaling bias over training (one line per layer)")
    return _save(fig, path)


def plot_losses(runs: dict[str, list[dict]], path: Path) -> Path | None:
    if not any("train/loss" in r for records in runs.values() for r in records):
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, records) in enumerate(runs.items()):
        color = plt.get_cmap("tab10")(i % 10)
        for key, style in (("train/loss", "-"), ("val/loss", "o--")):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), style, color=color, label=f"{name} {key.split('/')[0]}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_run_plots(run_dirs: list[Path], out: Path | None = None) -> list[Path]:
    """Every plot the runs' metrics allow; returns the files written."""
    runs = {Path(d).name: read_metrics(d) for d in run_dirs}
    out = Path(out) if out is not None else Path(run_dirs[0]) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    first_name, first = next(iter(runs.items()))
    written = [plot_bias_by_layer(first, out / "scaling_bias_by_layer.png", first_name),
               plot_bias_over_training(first, out / "scaling_bias_over_training.png", first_name),
               plot_losses(runs, out / "loss.png")]
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fp8train-plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: FIRST_RUN/plots)")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        if not (run_dir / METRICS_FILE).is_file():
            print(f"fp8train-plot: error: {run_dir} has no {METRICS_FILE}; expected a fp8train run directory",
                  file=sys.stderr)
            sys.exit(2)
    for path in write_run_plots(args.run_dirs, args.out):
        print(path)


if __name__ == "__main__":
    main()
