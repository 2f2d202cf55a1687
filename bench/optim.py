"""Optimizer benchmark: Fp8AdamW against torch.optim.AdamW on a ~50M-parameter GPT, on this CPU.

    python bench/optim.py                 # ~1 minute; prints one table
    python bench/optim.py --rounds 5      # quicker, noisier

Measured per optimizer, in one process, on identical models and gradients:
  bytes / param  weights + master + optimizer state (moments, scales, step counts), from the tensors'
                 nbytes; gradients are not counted (every optimizer needs the same ones).
  step ms        median wall time of ``step()`` after two warm-up steps. The optimizers take turns
                 round by round, so background load on the machine falls on all of them alike.
Ratios are against torch.optim.AdamW(fused=True) with fp32 weights, the strongest CPU baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fp8train.models.gpt import GPT, GPTConfig
from fp8train.optim import Fp8AdamW

MODEL = GPTConfig(vocab_size=256, block_size=1024, n_layer=7, n_head=12, n_embd=768)  # 50.6M parameters


@dataclass(kw_only=True, slots=True)
class Case:
    """name: table label; weights: parameter (and gradient) dtype; make: optimizer factory."""

    name: str
    weights: torch.dtype
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


CASES = [
    Case(name="torch AdamW fused=True", weights=torch.float32, make=lambda ps: torch.optim.AdamW(ps, fused=True)),
    Case(name="torch AdamW foreach=True", weights=torch.float32, make=lambda ps: torch.optim.AdamW(ps, foreach=True)),
    # defaults: e4m3 m, fp16 v, scaled fp16 master
    Case(name="Fp8AdamW defaults", weights=torch.float32, make=lambda ps: Fp8AdamW(ps)),
    Case(name="Fp8AdamW defaults", weights=torch.bfloat16, make=lambda ps: Fp8AdamW(ps)),
    # fp32 master: a separate copy beside bf16 weights, or the fp32 weights themselves
    Case(name="Fp8AdamW fp32 master", weights=torch.bfloat16,
         make=lambda ps: Fp8AdamW(ps, master_dtype=torch.float32)),
    Case(name="Fp8AdamW fp32 master=weights", weights=torch.float32, make=lambda ps: Fp8AdamW(ps, master_dtype=None)),
    # no master at all: bf16 weights updated in place (loses updates below half a bf16 ulp)
    Case(name="Fp8AdamW bf16 master=weights", weights=torch.bfloat16, make=lambda ps: Fp8AdamW(ps, master_dtype=None)),
]


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = list(GPT(MODEL).to(dtype).parameters())
    gen = torch.Generator().manual_seed(1)
    for p in params:  # gradients of a plausible size; the same values for every optimizer
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(dtype)
    return params


def _bytes_per_param(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer) -> float:
    state = sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    weights = sum(p.nbytes for p in params)
    return (weights + state) / sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per optimizer (median reported)")
    args = parser.parse_args()

    runs = []
    for case in CASES:
        params = _params(case.weights)
        opt = case.make(params)
        for _ in range(2):  # warm-up: state allocation, kernel build/load
            opt.step()
        runs.append((case, params, opt, []))
    for _ in range(args.rounds):
        for _, _, opt, times in runs:
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)

    n_params = sum(p.numel() for p in runs[0][1])
    base_bytes = _bytes_per_param(runs[0][1], runs[0][2])
    base_ms = statistics.median(runs[0][3]) * 1e3
    print(f"Optimizer step, GPT {n_params / 1e6:.1f}M parameters, {torch.get_num_threads()} CPU threads, "
          f"median of {args.rounds} steps; baseline = torch AdamW fused=True, fp32 weights")
    header = f"| {'optimizer':<29} | {'weights':<8} | {'bytes/param':>11} | {'vs base':>7} | {'step ms':>8} | {'vs base':>7} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for case, params, opt, times in runs:
        nbytes, ms = _bytes_per_param(params, opt), statistics.median(times) * 1e3
        weights = str(case.weights).removeprefix("torch.")
        print(f"| {case.name:<29} | {weights:<8} | {nbytes:>11.2f} | {nbytes / base_bytes:>6.2f}x | {ms:>8.1f} | "
              f"{ms / base_ms:>6.2f}x |")


if __name__ == "__main__":
    main()
