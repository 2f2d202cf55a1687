"""``fp8train-eval``: FP8 post-training quantization study of a trained run (the Graphcore paper's Table 3
and Figure 5): validation loss and top-1 next-token accuracy of

  (a) the model as trained (fp32, bf16, or -- for an FP8-trained run -- its FP8 layers and scales),
  (b) FP8-AMAX:   the trained weights, every linear layer but the head in E4M3 with just-in-time
                  per-tensor amax scaling,
  (c) FP8-CSCALE: the same with one constant scaling bias k for every tensor, for each k of a sweep,

all on the same fixed validation batches. See ``fp8train.ptq`` for the numerics.

    fp8train-eval outputs/gpt_tiny-fp32                      # latest checkpoint, biases -8:16
    fp8train-eval RUN_DIR --biases -12:20:2 --batches 32     # another sweep, more tokens
    fp8train-eval RUN_DIR --checkpoint RUN_DIR/checkpoints/step_00000100 --out /tmp/ptq

Prints one table and the interval of biases whose accuracy is >= 99.5 % of (a); writes ``ptq.json``
(every number) and ``ptq_accuracy_vs_bias.png`` into ``--out`` (default RUN_DIR/ptq), atomically.
Bad inputs print ONE line ``fp8train-eval: error: ...``, exit with status 2, and write nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from torch import nn
from tqdm import tqdm

from fp8train._atomic import atomic_write, atomic_write_text
from fp8train.errors import ConfigError
from fp8train.linear import Fp8Linear
from fp8train.ptq import evaluate_lm, quantize_for_inference, track_fp8_casts
from fp8train.scaling import LOG2_SCALE_MAX, LOG2_SCALE_MIN
from fp8train.trainer.build import build_model
from fp8train.trainer.checkpoint import checkpoint_step, latest_checkpoint
from fp8train.trainer.config import TrainConfig, train_config_from_mapping
from fp8train.trainer.data import load_token_data, validation_windows
from fp8train.trainer.precision import apply_precision

__all__ = ["ACCURACY_THRESHOLD", "TrainedRun", "UsageError", "format_report", "load_run", "main", "parse_biases",
           "passing_interval", "plot_accuracy_vs_bias", "ptq_study"]

ACCURACY_THRESHOLD = 0.995   # CSCALE passes at >= 99.5 % of the reference's accuracy (relative)
DEFAULT_BIASES = "-8:16"
_PROG = "fp8train-eval"
_EXIT_USAGE = 2
_MODEL_FILE = "model.pt"
# The sections of config.yaml an evaluation needs; the rest (logging, launcher, ...) is ignored, so
# runs written by an older trainer whose other sections have since changed still evaluate.
_CONFIG_SECTIONS = ("seed", "model", "data", "precision", "train")


class UsageError(ValueError):
    """A bad command-line input: reported as one line, exit status 2."""


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


@dataclass(frozen=True, slots=True)
class TrainedRun:
    """A run's config and one checkpoint's model state_dict (on the CPU)."""

    run_dir: Path
    cfg: TrainConfig
    checkpoint: Path
    step: int | None
    state_dict: dict[str, torch.Tensor]


def parse_biases(text: str) -> list[int]:
    """``LO:HI`` or ``LO:HI:STEP`` (inclusive) or a comma list ``a,b,c`` -> sorted distinct ints,
    each in [LOG2_SCALE_MIN, LOG2_SCALE_MAX]. UsageError (one line) otherwise."""
    allowed = (f"allowed: LO:HI or LO:HI:STEP (integers, inclusive, LO <= HI, STEP >= 1) or a comma list "
               f"a,b,c, each in [{LOG2_SCALE_MIN}, {LOG2_SCALE_MAX}]")
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3) or parts[0] > parts[1] or (len(parts) == 3 and parts[2] < 1):
                raise ValueError
            biases = list(range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1))
        else:
            biases = sorted({int(p) for p in text.split(",")})
    except ValueError:
        raise UsageError(f"--biases={text!r} is malformed; {allowed}") from None
    if not all(LOG2_SCALE_MIN <= b <= LOG2_SCALE_MAX for b in biases):
        raise UsageError(f"--biases={text!r} is out of range; {allowed}")
    return biases


def _load_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.yaml"
    if not run_dir.is_dir() or not path.is_file():
        raise UsageError(f"RUN_DIR={str(run_dir)!r} is not a run directory (no config.yaml); allowed: a directory "
                         "written by fp8train")
    try:
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a mapping")
        return train_config_from_mapping({k: raw[k] for k in _CONFIG_SECTIONS if k in raw})
    except (yaml.YAMLError, ValueError, TypeError) as e:
        raise UsageError(f"{path}: invalid run config: {_first_line(e)}") from None


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> TrainedRun:
    """The run's config and the state_dict of ``checkpoint`` (a checkpoint directory or its
    model.pt; default: the run's latest complete checkpoint). UsageError for anything missing."""
    run_dir = Path(run_dir)
    cfg = _load_config(run_dir)
    if checkpoint is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise UsageError(f"RUN_DIR={str(run_dir)!r} holds no complete checkpoint (checkpoints/step_*); "
                             "train it first or pass --checkpoint")
    else:
        ckpt = Path(checkpoint)
        ckpt = ckpt.parent if ckpt.is_file() else ckpt
    model_file = ckpt / _MODEL_FILE
    if not model_file.is_file():
        shown = str(checkpoint if checkpoint is not None else ckpt)
        raise UsageError(f"--checkpoint={shown!r} holds no {_MODEL_FILE}; allowed: a checkpoint directory "
                         "(checkpoints/step_*) or its model.pt")
    try:
        state_dict = torch.load(model_file, map_location="cpu", weights_only=True)
        step = checkpoint_step(ckpt) if (ckpt / "trainer.json").is_file() else None
    except Exception as e:  # a truncated or foreign file: the input's fault
        raise UsageError(f"cannot read {model_file}: {type(e).__name__}: {_first_line(e)}") from None
    return TrainedRun(run_dir=run_dir, cfg=cfg, checkpoint=ckpt, step=step, state_dict=state_dict)


def _load(model: nn.Module, state_dict: dict[str, torch.Tensor], where: Path) -> nn.Module:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UsageError(f"{where}: the weights do not fit the run's model: {_first_line(e)}") from None
    return model


def _as_trained(run: TrainedRun, device: torch.device) -> tuple[nn.Module, Callable[[], AbstractContextManager[Any]]]:
    """The model exactly as it trained and validated: its precision's layers (FP8 ones with their
    checkpointed scaling state) and forward context."""
    model = build_model(run.cfg.model, seed=run.cfg.seed, device=device)
    forward_ctx = apply_precision(model, run.cfg.precision, device)
    return _load(model, run.state_dict, run.checkpoint / _MODEL_FILE), forward_ctx


def _high_precision(run: TrainedRun, device: torch.device, trained_keys: set[str]) -> nn.Module:
    """The model to quantize: the trained weights in high-precision layers (emulated bf16 for a
    bf16 run on CPU, else fp32), without any FP8 scaling state of an FP8-trained run."""
    model = build_model(run.cfg.model, seed=run.cfg.seed, device=device)
    if run.cfg.precision.gemm == "bf16":
        apply_precision(model, run.cfg.precision, device)   # Bf16Linear on CPU; nothing on CUDA
    keys = set(model.state_dict())
    if not keys <= trained_keys:  # unreachable after _as_trained loaded strictly, unless layers differ
        raise UsageError(f"{run.checkpoint}: missing weights {sorted(keys - trained_keys)[:3]}")
    return _load(model, {k: v for k, v in run.state_dict.items() if k in keys}, run.checkpoint / _MODEL_FILE)


def passing_interval(biases: Sequence[int], passed: Sequence[bool]) -> tuple[int, int] | None:
    """The longest run of consecutive sweep entries that pass, as (first bias, last bias); None if
    none passes (ties: the lower biases)."""
    best: tuple[int, int] | None = None
    start = None
    for i, ok in enumerate([*passed, False]):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            if best is None or i - start > best[1] - best[0] + 1:
                best = (start, i - 1)
            start = None
    return None if best is None else (biases[best[0]], biases[best[1]])


def _row(name: str, bias: int | None, loss: float, acc: float, ref_acc: float, casts: dict | None) -> dict[str, Any]:
    return {"variant": name, "bias": bias, "loss": loss, "accuracy": acc,
            "relative_accuracy": acc / ref_acc if ref_acc > 0 else None, "casts": casts}


def ptq_study(run: TrainedRun, biases: Sequence[int], *, n_batches: int, device: torch.device,
              progress: bool = True) -> dict[str, Any]:
    """Evaluate (a) as trained, (b) FP8-AMAX, (c) FP8-CSCALE at every bias on the same ``n_batches``
    validation batches (micro_batch_size x block_size each); returns every number (ptq.json)."""
    cfg = run.cfg
    data = load_token_data(cfg.data, seq_len=cfg.block_size, vocab_size=cfg.vocab_size)
    batch_size = cfg.train.micro_batch_size
    n_windows = (len(data.val) - 1) // cfg.block_size
    if n_batches * batch_size > n_windows:
        raise UsageError(f"--batches={n_batches} needs {n_batches * batch_size} validation windows but the val split "
                         f"holds {n_windows}; allowed: 1..{n_windows // batch_size}")
    batches = validation_windows(data.val, seq_len=cfg.block_size, batch_size=batch_size, n_batches=n_batches,
                                 rank=0, world_size=1)
    trained, forward_ctx = _as_trained(run, device)
    trained_keys = set(run.state_dict)
    fp8_trained = cfg.precision.gemm == "fp8"
    ref_name = f"{cfg.precision.name} as trained" + (f" (FP8 {cfg.precision.fp8.recipe})" if fp8_trained else "")
    bar = tqdm(total=2 + len(biases), desc=_PROG, unit="model", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    with bar:
        with forward_ctx():
            ref_loss, ref_acc = evaluate_lm(trained, batches)
        rows = [_row(ref_name, None, ref_loss, ref_acc, ref_acc, None)]
        bar.update()
        for recipe, bias in [("amax", None), *(("cscale", b) for b in biases)]:
            model = quantize_for_inference(_high_precision(run, device, trained_keys), recipe=recipe, bias=bias)
            if not any(isinstance(m, Fp8Linear) for m in model.modules()):
                raise UsageError(f"{cfg.model.name}: no linear layer besides the output head has both dims "
                                 "multiples of 16; nothing to quantize")
            with track_fp8_casts(model) as tally:
                loss, acc = evaluate_lm(model, batches)
            rows.append(_row("FP8-AMAX" if recipe == "amax" else "FP8-CSCALE", bias, loss, acc, ref_acc,
                             tally.as_dict()))
            bar.set_postfix_str(f"{recipe}{'' if bias is None else f' {bias:+d}'}: acc {acc:.4f}")
            bar.update()
    cscale = rows[2:]
    passed = [r["relative_accuracy"] is not None and r["relative_accuracy"] >= ACCURACY_THRESHOLD for r in cscale]
    interval = passing_interval(list(biases), passed)
    return {
        "run_dir": str(run.run_dir), "checkpoint": str(run.checkpoint), "step": run.step,
        "trained_precision": cfg.precision.name, "trained_gemm": cfg.precision.gemm, "device": str(device),
        "batches": n_batches, "batch_size": batch_size, "seq_len": cfg.block_size,
        "tokens": n_batches * batch_size * cfg.block_size, "skip_output_head": True,
        "threshold": ACCURACY_THRESHOLD,
        "reference": rows[0], "amax": rows[1], "cscale": cscale,
        "passing_biases": [r["bias"] for r, ok in zip(cscale, passed) if ok],
        "interval": None if interval is None else list(interval),
        "interval_at_sweep_edge": interval is not None and (interval[0] == biases[0] or interval[1] == biases[-1]),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def format_report(study: dict[str, Any]) -> str:
    """The table (one row per model; * marks CSCALE biases that pass) and the bias interval."""
    head = (f"{'model':<32} {'bias':>5} {'loss':>8} {'accuracy':>9} {'rel. acc %':>10} {'in sat %':>9} "
            f"{'in flush %':>10} {'w sat %':>8} {'w flush %':>9}")
    lines = [f"{study['run_dir']} (checkpoint {Path(study['checkpoint']).name}): validation, {study['tokens']} "
             f"tokens ({study['batches']} x {study['batch_size']} x {study['seq_len']}); output head in high precision",
             head, "-" * len(head)]
    if study["trained_gemm"] == "fp8":
        lines.insert(1, f"the run trained in FP8 ({study['trained_precision']}): the reference is the model as "
                        "trained, FP8 layers with their checkpointed scales; AMAX and CSCALE re-quantize its fp32 "
                        "weights")
    passing = set(study["passing_biases"])
    for row in [study["reference"], study["amax"], *study["cscale"]]:
        casts = row["casts"] or {}
        cin, cw = casts.get("input", {}), casts.get("weight", {})
        bias = "-" if row["variant"] != "FP8-CSCALE" else f"{row['bias']:+d}"
        lines.append(f"{row['variant']:<32} {bias:>5} {row['loss']:>8.4f} {row['accuracy']:>9.4f} "
                     f"{_pct(row['relative_accuracy']):>10} {_pct(cin.get('saturated_fraction')):>9} "
                     f"{_pct(cin.get('underflowed_fraction')):>10} {_pct(cw.get('saturated_fraction')):>8} "
                     f"{_pct(cw.get('underflowed_fraction')):>9}"
                     + (" *" if row["variant"] == "FP8-CSCALE" and row["bias"] in passing else ""))
    amax = study["amax"]["casts"]
    cin, cw = amax["input"], amax["weight"]
    lines.append(f"FP8-AMAX chose biases {cin['log2_scale_min']:+.0f}..{cin['log2_scale_max']:+.0f} for inputs, "
                 f"{cw['log2_scale_min']:+.0f}..{cw['log2_scale_max']:+.0f} for weights "
                 "(sat = |x|*2^bias > 448, clamped; flush = nonzero x cast to 0)")
    target = f"FP8-CSCALE biases with accuracy >= {100 * study['threshold']:.1f} % of {study['reference']['variant']}"
    if study["interval"] is None:
        lines.append(f"{target}: none")
    else:
        lo, hi = study["interval"]
        others = sorted(set(study["passing_biases"]) - set(range(lo, hi + 1)))
        lines.append(f"{target}: [{lo:+d}, {hi:+d}]" + (f" (also passing: {others})" if others else "")
                     + (" -- at the edge of the sweep: widen --biases" if study["interval_at_sweep_edge"] else ""))
    return "\n".join(lines)


def plot_accuracy_vs_bias(study: dict[str, Any]) -> bytes:
    """PNG: CSCALE accuracy vs bias, the reference and AMAX as horizontal lines, the band at or
    above the threshold shaded (Agg canvas on a Figure: no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ref, amax = study["reference"], study["amax"]
    biases = [r["bias"] for r in study["cscale"]]
    accs = [r["accuracy"] for r in study["cscale"]]
    fig = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = max([ref["accuracy"], amax["accuracy"], *accs]) * 1.05 + 0.01
    ax.axhspan(study["threshold"] * ref["accuracy"], top, color="tab:green", alpha=0.15,
               label=f">= {100 * study['threshold']:.1f} % of {ref['variant']}")
    ax.axhline(ref["accuracy"], color="black", linestyle="--", label=f"{ref['variant']}: {ref['accuracy']:.4f}")
    ax.axhline(amax["accuracy"], color="tab:orange", linestyle=":", linewidth=2,
               label=f"FP8-AMAX: {amax['accuracy']:.4f}")
    if study["interval"] is not None:
        lo, hi = study["interval"]
        ax.axvspan(lo - 0.25, hi + 0.25, color="tab:blue", alpha=0.08, label=f"passing biases [{lo:+d}, {hi:+d}]")
    ax.plot(biases, accs, "o-", color="tab:blue", label="FP8-CSCALE (constant bias)")
    ax.set_ylim(0, top)
    ax.set_xlabel("scaling bias k (every input and weight stored as x * 2^k in E4M3)")
    ax.set_ylabel("top-1 next-token accuracy")
    step = "" if study["step"] is None else f", step {study['step']}"
    ax.set_title(f"FP8 post-training quantization: {Path(study['run_dir']).name}{step}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def _parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:  # argparse's own errors: one line too
            _fail(message)

    p = Parser(prog=_PROG, description="FP8 post-training quantization study of a trained fp8train run: loss and "
               "next-token accuracy as trained, with FP8-AMAX, and with FP8-CSCALE for a sweep of scaling biases.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by fp8train (config.yaml, checkpoints/)")
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint directory or its model.pt (default: the latest)")
    p.add_argument("--biases", default=DEFAULT_BIASES, metavar="LO:HI[:STEP]|a,b,c",
                   help=f"CSCALE scaling biases to sweep, inclusive (default {DEFAULT_BIASES})")
    p.add_argument("--batches", type=int, default=16, metavar="N",
                   help="validation batches of micro_batch_size x block_size tokens (default 16)")
    p.add_argument("--out", metavar="DIR", help="output directory (default RUN_DIR/ptq)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _fail(message: str) -> NoReturn:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    sys.exit(_EXIT_USAGE)


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device={text!r} is not a device; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device={text!r}: CUDA is not available here; allowed: cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device={text!r} is not supported; allowed: cpu, cuda, cuda:N")
    return device


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--biases -4:12`` -> ``--biases=-4:12``: argparse takes a value starting with '-' that is not
    a plain number for an option and would reject it."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--biases" and i + 1 < len(argv):
            out.append(f"--biases={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    try:
        biases = parse_biases(args.biases)
        if args.batches < 1:
            raise UsageError(f"--batches={args.batches} is out of range; allowed: integers >= 1")
        device = _device(args.device)
        run = load_run(args.run_dir, args.checkpoint)
        out = Path(args.out) if args.out else run.run_dir / "ptq"
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out={str(out)!r} exists and is not a directory")
        study = ptq_study(run, biases, n_batches=args.batches, device=device, progress=not args.no_progress)
    except (UsageError, ConfigError) as e:  # ConfigError: e.g. the run's data is gone; one line naming the key
        _fail(str(e).splitlines()[0])
    print(format_report(study))
    out.mkdir(parents=True, exist_ok=True)
    png, js = out / "ptq_accuracy_vs_bias.png", out / "ptq.json"
    atomic_write(png, lambda f: f.write(plot_accuracy_vs_bias(study)))
    atomic_write_text(js, json.dumps(study, indent=1) + "\n")   # last: its presence means complete
    print(f"wrote {js} and {png}")


if __name__ == "__main__":
    main()
