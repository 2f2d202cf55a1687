"""Cast throughput: amax + scale + quantize to E4M3, against a plain copy of the same tensor.

    python bench/cast.py                 # 16M and 64M fp32 elements on CPU (target: >= 0.5x memcpy)
    python bench/cast.py --device cuda   # same on a GPU (target: >= 0.8x memcpy)
    python bench/cast.py --dry-run       # every row, tiny, on CPU

Every row processes the same fp32 tensor; "x memcpy" is memcpy's time over the row's time (higher is
faster). GB/s counts the bytes each row must move at least (reads + writes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds, verdict  # noqa: E402

from fp8train import E4M3, Fp8Config, amax_to_scale, quantize, tensor_to_amax  # noqa: E402
from fp8train.cast import cast_to_fp8, cast_to_fp8_reference  # noqa: E402
from fp8train.scaling_state import ScalingState  # noqa: E402


def _naive_chain(x: torch.Tensor) -> torch.Tensor:
    """What one writes without thinking: abs, amax, scale, mul, clamp, cast -- six eager passes."""
    amax = x.abs().amax()
    scale = amax_to_scale(amax, E4M3)
    return (x * scale).clamp(-E4M3.max, E4M3.max).to(E4M3.dtype)


def _compiled_quantize(recipe: str, x: torch.Tensor):
    """A layer's cast as torch.compile sees it: ScalingState.quantize (amax, scale, cast, state
    update) in one graph. ``delayed`` after its first cast: the cast needs no fresh amax (one pass)."""
    state = ScalingState(E4M3, Fp8Config(recipe=recipe), device=x.device)
    state.quantize(x)  # the first cast (delayed: its own amax); from now on, a history

    def cast(t: torch.Tensor) -> torch.Tensor:
        return state.quantize(t).data

    return torch.compile(cast, fullgraph=True)


def rows_for(numel: int, device: torch.device) -> list[tuple[str, float, int]]:
    """(label, seconds, bytes moved at minimum) per variant."""
    x = torch.randn(numel, device=device) * 3
    copy_dst = torch.empty_like(x)
    out = torch.empty(numel, dtype=E4M3.dtype, device=device)
    scale = amax_to_scale(tensor_to_amax(x), E4M3)
    r, w = 4 * numel, numel  # fp32 read, fp8 write
    return [
        ("memcpy fp32 (baseline)", median_seconds(lambda: copy_dst.copy_(x), device=device), 2 * r),
        ("amax only", median_seconds(lambda: tensor_to_amax(x), device=device), r),
        ("scale+clamp+cast, fast kernel", median_seconds(lambda: cast_to_fp8(x, scale, E4M3, out=out), device=device), r + w),
        ("amax+scale+quantize (ours)", median_seconds(lambda: quantize(x, E4M3, out=out), device=device), 2 * r + w),
        ("  same, fresh output buffer", median_seconds(lambda: quantize(x, E4M3), device=device), 2 * r + w),
        ("  same, eager cast", median_seconds(lambda: quantize(x, E4M3, fast=False, out=out), device=device), 2 * r + w),
        ("naive eager chain", median_seconds(lambda: _naive_chain(x), device=device), 2 * r + w),
        ("eager reference cast only", median_seconds(lambda: cast_to_fp8_reference(x, scale, E4M3), device=device), r + w),
        ("compiled current (2 passes)", median_seconds(lambda f=_compiled_quantize("current", x): f(x), device=device), 2 * r + w),
        ("compiled delayed (1 pass)", median_seconds(lambda f=_compiled_quantize("delayed", x): f(x), device=device), r + w),
    ]


# target for "amax+scale+quantize (ours)": >= 0.5x memcpy on CPU, >= 0.8x on CUDA
TARGETS = {"cpu": 0.5, "cuda": 0.8}
TARGET_ROW = "amax+scale+quantize (ours)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes-m", type=int, nargs="+", default=[16, 64], help="sizes in Mi elements")
    parser.add_argument("--dry-run", action="store_true", help="1 Mi elements on CPU: checks every row")
    args = parser.parse_args()
    if args.dry_run:
        args.device, args.sizes_m = "cpu", [1]
    device = torch.device(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'elements':>9} | {'variant':<32} | {'ms':>8} | {'GB/s':>6} | {'x memcpy':>8} | target")
    print("-" * 93)
    for size_m in args.sizes_m:
        rows = rows_for(size_m << 20, device)
        memcpy_s = rows[0][1]
        for label, seconds, nbytes in rows:
            target = TARGETS.get(device.type) if label == TARGET_ROW else None
            print(f"{size_m:>8}M | {label:<32} | {seconds * 1e3:8.2f} | {nbytes / seconds / 1e9:6.1f} | "
                  f"{memcpy_s / seconds:8.2f} | {verdict(memcpy_s / seconds, target)}")


if __name__ == "__main__":
    main()
