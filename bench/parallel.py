"""Trainer throughput by parallel strategy on N gloo processes: one table, every row in one run.

    python bench/parallel.py                       # gpt_small, N = 2, ddp / zero2 / fsdp2 (fp8_o2, fp8_o3) / deepspeed
    python bench/parallel.py --strategies ddp,fsdp2 --repeat 5
    python bench/parallel.py --dry-run             # gpt_tiny, tiny batches: checks every row

Each row builds the model as the trainer does (``build_model``, ``apply_precision``, ``build_strategy``),
precision fp8_o2 unless the row names another after "+" (``fsdp2+fp8_o3``: FP8 primary weights; deepspeed:
with ``precision.grad_comm=native``, its own collectives), and times whole
optimizer steps on random tokens -- forward, backward, the strategy's step (sync, clip, update),
``zero_grad`` -- as the median of ``--repeat`` steps after ``--warmup``, on every rank (the slowest rank's
median is the row's). tokens/s counts every rank's tokens. comm: bytes a rank sent per step, as the
strategy reports them (``StepOutcome.comm_bytes``). The ratio is against the first row (ddp). On CPU the
FP8 GEMMs are an fp32 emulation and the collectives run over loopback: the table shows what sharding
costs in compute and copies here, not a GPU cluster's speed (docs/scaling.md projects that).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the multi-process runner
from gloo_spawn import run_on_gloo  # noqa: E402
from step import _config  # noqa: E402

from fp8train.trainer.config import train_config_from_mapping, train_config_to_mapping  # noqa: E402

STRATEGIES = ("ddp", "zero2", "fsdp2", "fsdp2+fp8_o3", "deepspeed")


def _worker(rank: int, world: int, row: str, args: dict) -> dict:
    from fp8train.trainer.build import build_model
    from fp8train.trainer.distributed import DistEnv
    from fp8train.trainer.precision import apply_precision
    from fp8train.trainer.strategy import build_strategy

    warnings.filterwarnings("ignore", category=FutureWarning)
    strategy_name, _, precision = row.partition("+")
    base = train_config_to_mapping(_config(args["model"], precision or "fp8_o2", device="cpu",
                                           micro_batch=args["micro_batch"], seq=args["seq"]))
    base["parallel"]["strategy"] = strategy_name
    if strategy_name == "deepspeed":
        base["precision"]["grad_comm"] = "native"
    cfg = train_config_from_mapping(base)
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world, device=torch.device("cpu"))
    model = build_model(cfg.model, seed=0, device=env.device)
    forward_ctx = apply_precision(model, cfg.precision, env.device)
    strategy = build_strategy(model, cfg, env)
    strategy.set_lr(1e-4)
    gen = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, cfg.vocab_size, (args["micro_batch"], cfg.block_size + 1), generator=gen)
    times, comm = [], 0
    for i in range(args["warmup"] + args["repeat"]):
        start = time.perf_counter()
        with strategy.accumulating(sync=True), forward_ctx():
            _, loss = strategy.module(tokens[:, :-1], tokens[:, 1:])
            strategy.backward(loss)
        comm = strategy.step().comm_bytes
        strategy.zero_grad()
        if i >= args["warmup"]:
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "comm": comm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt_small")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="the first is the baseline")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true", help="gpt_tiny, 2 x 64 tokens, 1 + 2 steps")
    args = parser.parse_args()
    if args.dry_run:
        args.model, args.micro_batch, args.seq, args.warmup, args.repeat = "gpt_tiny", 2, 64, 1, 2
    work = dict(model=args.model, micro_batch=args.micro_batch, seq=args.seq, warmup=args.warmup, repeat=args.repeat)
    print(f"Trainer step, {args.model}, fp8_o2 (unless a row names another), {args.world} gloo processes, "
          f"{args.micro_batch} x {args.seq} tokens per rank, median of {args.repeat} steps")
    print(f"| {'parallel':<12} | {'step ms':>8} | {'tokens/s':>9} | {'vs first':>8} | {'comm MB/step/rank':>17} |")
    print("|" + "|".join("-" * n for n in (14, 10, 11, 10, 19)) + "|")
    base = None
    for name in args.strategies.split(","):
        results = run_on_gloo(_worker, args.world, name, work, timeout_s=1200, collective_timeout_s=600)
        seconds = max(r["seconds"] for r in results)
        tokens_per_s = args.world * args.micro_batch * args.seq / seconds
        base = base or tokens_per_s
        print(f"| {name:<12} | {seconds * 1e3:8.1f} | {tokens_per_s:9.0f} | {tokens_per_s / base:7.2f}x | "
              f"{max(r['comm'] for r in results) / 1e6:17.2f} |", flush=True)


if __name__ == "__main__":
    main()
