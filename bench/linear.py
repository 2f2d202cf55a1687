"""Fp8Linear forward+backward time against the high-precision nn.Linear it replaces.

    python bench/linear.py                  # CPU: emulated FP8 vs fp32 (the emulation's overhead)
    python bench/linear.py --device cuda    # GPU: FP8 tensor cores (scaled_mm) vs bf16

Shapes are (tokens, in_features, out_features) of transformer projections.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds  # noqa: E402

from fp8train import Fp8Config, Fp8Linear  # noqa: E402

CPU_SHAPES = [(2048, 512, 2048), (2048, 2048, 512)]
GPU_SHAPES = [(8192, 4096, 4096), (8192, 4096, 16384), (8192, 16384, 4096), (16384, 8192, 8192)]


def _fwd_bwd(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    layer.weight.grad = None
    layer(x).backward(dy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    hp_dtype = torch.bfloat16 if gpu else torch.float32
    backend = "scaled_mm" if gpu else "emulated"
    print(f"device={torch.cuda.get_device_name(device) if gpu else 'cpu'} torch={torch.__version__} "
          f"baseline={hp_dtype} nn.Linear, ours=Fp8Linear(backend={backend}, recipe=current)")
    print(f"{'tokens x in x out':>20} | {'baseline ms':>11} | {'fp8 ms':>8} | {'speed-up':>8} | {'fp8 TFLOP/s':>11}")
    print("-" * 72)
    for m, k, n in GPU_SHAPES if gpu else CPU_SHAPES:
        base = nn.Linear(k, n, bias=False, device=device, dtype=hp_dtype)
        ours = Fp8Linear(k, n, bias=False, config=Fp8Config(backend=backend), device=device, dtype=hp_dtype)
        x = torch.randn(m, k, device=device, dtype=hp_dtype, requires_grad=True)
        dy = torch.randn(m, n, device=device, dtype=hp_dtype)
        t_base = median_seconds(lambda: _fwd_bwd(base, x, dy), device=device, warmup=3, repeat=10)
        t_ours = median_seconds(lambda: _fwd_bwd(ours, x, dy), device=device, warmup=3, repeat=10)
        flops = 3 * 2 * m * k * n  # forward, dgrad, wgrad
        print(f"{f'{m}x{k}x{n}':>20} | {t_base * 1e3:11.2f} | {t_ours * 1e3:8.2f} | {t_base / t_ours:8.2f} | {flops / t_ours / 1e12:11.1f}")


if __name__ == "__main__":
    main()
