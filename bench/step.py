"""Trainer step time, eager against torch.compile, for each precision preset: one table.

    python bench/step.py                                   # CPU: gpt_small, llama_small; fp8_o2 eager vs compiled
    python bench/step.py --device cuda --models llama_1b --precisions bf16,fp8_o2,fp8_o3 \\
        --modes compiled --micro-batch 4 --seq 2048        # GPU: bf16 vs FP8, both compiled
    python bench/step.py --dry-run ...                     # the same rows with llama_tiny, tiny batches, on CPU

Each row builds the model exactly as the trainer does (``build_model``, ``apply_precision``,
``compile_blocks`` for ``compiled``, ``build_strategy`` on a one-process group, the optimizer of the
preset) and times whole optimizer steps -- forward and backward under the preset's context, the
strategy's step (gradient sync, clip, update) and ``zero_grad`` -- on random tokens, reporting the
median of ``--repeat`` steps after ``--warmup`` (compilation happens in the warm-up). The ratio
column divides by the first row of the same model (the baseline: put it first); the target column
is computed from it: on CPU a compiled row against an eager first row of its precision (>= 1.0), on
CUDA the fp8_o2 row against a bf16 first row (>= 1.15). Peak memory is the
CUDA allocator's peak of the row; on CPU it is not measured per row (the process RSS only grows).
Graph breaks: ``torch._dynamo.explain`` of one block's forward (compiled rows).
On CPU the FP8 GEMMs are an fp32 emulation: CPU rows show what compilation saves, not FP8's speed.
"""

from __future__ import annotations

import argparse
import gc
import sys
from importlib import resources
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds, verdict  # noqa: E402

from fp8train.trainer.build import build_model, count_parameters  # noqa: E402
from fp8train.trainer.compile import compile_blocks, transformer_blocks  # noqa: E402
from fp8train.trainer.config import TrainConfig, train_config_from_mapping  # noqa: E402
from fp8train.trainer.distributed import distributed_session  # noqa: E402
from fp8train.trainer.precision import apply_precision  # noqa: E402
from fp8train.trainer.strategy import build_strategy  # noqa: E402

# Targets, as speed vs the model's first row: on CPU a compiled FP8 step at least as fast as the
# eager FP8 one (first row eager); on CUDA an fp8_o2 step >= 1.15x bf16, both compiled (first row bf16).
CPU_TARGET, GPU_FP8_O2_TARGET = 1.0, 1.15
DRY_RUN = dict(models="llama_tiny", micro_batch=2, seq=64, warmup=2, repeat=2)  # sizes only: the rest as asked


def _group(group: str, option: str) -> dict:
    """One config group's YAML as shipped in the package (no Hydra: the GPU machine may lack it)."""
    return yaml.safe_load(resources.files("fp8train.configs").joinpath(group, f"{option}.yaml").read_text())


def _config(model: str, precision: str, *, device: str, micro_batch: int, seq: int) -> TrainConfig:
    return train_config_from_mapping({
        "model": {**_group("model", model), "block_size": seq}, "precision": _group("precision", precision),
        "train": {"micro_batch_size": micro_batch}, "launcher": {"device": device}, "run_dir": "unused",
    })


def _graph_breaks(block: torch.nn.Module, model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> int:
    """Graph breaks of one block's forward, traced with an input captured from a real forward."""
    captured: list[tuple] = []
    handle = block.register_forward_pre_hook(lambda _m, args, kwargs: captured.append((args, kwargs)),
                                             with_kwargs=True)
    with torch.no_grad():
        model(torch.zeros(1, cfg.block_size, dtype=torch.long, device=device))
    handle.remove()
    args, kwargs = captured[0]
    return torch._dynamo.explain(block._orig_mod if hasattr(block, "_orig_mod") else block)(*args, **kwargs).graph_break_count


def _row(model_name: str, precision: str, mode: str, args: argparse.Namespace) -> dict[str, object]:
    cfg = _config(model_name, precision, device=args.device, micro_batch=args.micro_batch, seq=args.seq)
    with distributed_session(cfg.launcher) as env:
        model = build_model(cfg.model, seed=0, device=env.device)
        forward_ctx = apply_precision(model, cfg.precision, env.device)
        breaks = _graph_breaks(transformer_blocks(model)[0], model, cfg, env.device) if mode == "compiled" else None
        if mode == "compiled":
            compile_blocks(model)
        strategy = build_strategy(model, cfg, env)
        strategy.set_lr(1e-4)
        g = torch.Generator(device="cpu").manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch, cfg.block_size + 1), generator=g).to(env.device)

        def step() -> None:
            with strategy.accumulating(sync=True), forward_ctx():
                _, loss = strategy.module(tokens[:, :-1], tokens[:, 1:])
                loss.backward()
            strategy.step()
            strategy.zero_grad()

        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        seconds = median_seconds(step, device=env.device, warmup=args.warmup, repeat=args.repeat)
        peak = torch.cuda.max_memory_allocated(env.device) / 2**30 if env.device.type == "cuda" else None
        n_params = count_parameters(model)
    gc.collect()
    torch._dynamo.reset()  # the next row compiles its own graphs
    return dict(model=model_name, params=n_params, precision=precision, mode=mode, seconds=seconds,
                tokens_per_s=args.micro_batch * args.seq / seconds, peak_gib=peak, breaks=breaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models", default="gpt_small,llama_small", help="model config names (configs/model)")
    parser.add_argument("--precisions", default="fp8_o2", help="precision presets; the first is the baseline")
    parser.add_argument("--modes", default="eager,compiled", help="eager and/or compiled")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (the model's block_size)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true", help="tiny models, few steps, CPU: checks every path")
    args = parser.parse_args()
    if args.dry_run:
        for key, value in DRY_RUN.items():
            setattr(args, key, value)
        args.device = "cpu"
    print(f"device={torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'} torch={torch.__version__} "
          f"micro_batch={args.micro_batch} seq={args.seq} (median of {args.repeat} steps after {args.warmup})")
    header = (f"{'model':>12} | {'params':>7} | {'precision':>9} | {'mode':>8} | {'ms/step':>9} | {'tokens/s':>9} | "
              f"{'peak GiB':>8} | {'vs first':>8} | {'breaks':>6} | target")
    print(header)
    print("-" * len(header))
    for model_name in args.models.split(","):
        baseline, first_row = None, None
        for precision in args.precisions.split(","):
            for mode in args.modes.split(","):
                r = _row(model_name, precision, mode, args)
                baseline, first_row = baseline or r["seconds"], first_row or (precision, mode)
                target = None
                if args.device == "cpu" and first_row == (precision, "eager") and mode == "compiled":
                    target = CPU_TARGET
                elif args.device == "cuda" and first_row[0] == "bf16" and precision == "fp8_o2":
                    target = GPU_FP8_O2_TARGET
                peak = f"{r['peak_gib']:8.2f}" if r["peak_gib"] is not None else f"{'-':>8}"
                breaks = f"{r['breaks']:6d}" if r["breaks"] is not None else f"{'-':>6}"
                print(f"{model_name:>12} | {r['params'] / 1e6:6.1f}M | {precision:>9} | {mode:>8} | "
                      f"{r['seconds'] * 1e3:9.1f} | {r['tokens_per_s']:9.0f} | {peak} | "
                      f"{baseline / r['seconds']:7.2f}x | {breaks} | {verdict(baseline / r['seconds'], target)}",
                      flush=True)


if __name__ == "__main__":
    main()
