"""Fp8Linear forward+backward time against the high-precision nn.Linear it replaces, eager and
compiled (torch.compile of each layer; the baseline compiled too), in one table.

    python bench/linear.py                  # CPU: emulated FP8 vs fp32 (the emulation's overhead)
    python bench/linear.py --device cuda    # GPU: FP8 tensor cores (scaled_mm) vs bf16, Llama-3-8B shapes
    python bench/linear.py --dry-run        # the GPU run's steps, tiny shapes, on CPU

Shapes are (tokens, in_features, out_features) of transformer projections; on the GPU those of
Llama-3-8B at 8192 tokens (attention q/o, MLP up/gate, MLP down) and two larger ones.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds, verdict  # noqa: E402

from fp8train import Fp8Config, Fp8Linear  # noqa: E402

CPU_SHAPES = [(2048, 512, 2048), (2048, 2048, 512)]
GPU_SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (8192, 4096, 16384),
              (16384, 8192, 8192)]
DRY_RUN_SHAPES = [(256, 64, 128)]
# target: compiled Fp8Linear fwd+bwd >= 1.2x compiled bf16 nn.Linear at Llama-3-8B's MLP up shape, on GPU
TARGET = ((8192, 4096, 14336), "compiled", 1.2)


def _fwd_bwd(layer: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             dy: torch.Tensor) -> None:
    layer.weight.grad = None
    forward(x).backward(dy)


def _forward(layer: nn.Module, compiled: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer's call, compiled whole (fullgraph; inductor fuses the casts) or eager. Compiled
    through a function: dynamo does not start tracing inside torch.nn's own frames."""
    return torch.compile(lambda x: layer(x), fullgraph=True) if compiled else layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="eager,compiled", help="eager and/or compiled")
    parser.add_argument("--shapes", default=None, help="MxKxN,... (default: the device's list above)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: checks every path")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run else args.device)
    gpu = device.type == "cuda"
    hp_dtype = torch.bfloat16 if gpu else torch.float32
    backend = "scaled_mm" if gpu else "emulated"
    shapes = DRY_RUN_SHAPES if args.dry_run else GPU_SHAPES if gpu else CPU_SHAPES
    if args.shapes and not args.dry_run:
        shapes = [tuple(int(d) for d in shape.split("x")) for shape in args.shapes.split(",")]
    print(f"device={torch.cuda.get_device_name(device) if gpu else 'cpu'} torch={torch.__version__} "
          f"baseline={hp_dtype} nn.Linear, ours=Fp8Linear(backend={backend}, recipe=current)")
    print(f"{'tokens x in x out':>20} | {'mode':>8} | {'baseline ms':>11} | {'fp8 ms':>8} | {'speed-up':>8} | "
          f"{'fp8 TFLOP/s':>11} | target")
    print("-" * 100)
    for m, k, n in shapes:
        for mode in args.modes.split(","):
            base = nn.Linear(k, n, bias=False, device=device, dtype=hp_dtype)
            ours = Fp8Linear(k, n, bias=False, config=Fp8Config(backend=backend), device=device, dtype=hp_dtype)
            f_base, f_ours = _forward(base, mode == "compiled"), _forward(ours, mode == "compiled")
            x = torch.randn(m, k, device=device, dtype=hp_dtype, requires_grad=True)
            dy = torch.randn(m, n, device=device, dtype=hp_dtype)
            t_base = median_seconds(lambda: _fwd_bwd(base, f_base, x, dy), device=device, warmup=3, repeat=10)
            t_ours = median_seconds(lambda: _fwd_bwd(ours, f_ours, x, dy), device=device, warmup=3, repeat=10)
            flops = 3 * 2 * m * k * n  # forward, dgrad, wgrad
            target = TARGET[2] if gpu and ((m, k, n), mode) == TARGET[:2] else None
            print(f"{f'{m}x{k}x{n}':>20} | {mode:>8} | {t_base * 1e3:11.2f} | {t_ours * 1e3:8.2f} | "
                  f"{t_base / t_ours:8.2f} | {flops / t_ours / 1e12:11.1f} | {verdict(t_base / t_ours, target)}",
                  flush=True)
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
