"""Model-state memory per parameter per rank: weights + gradients + master + optimizer moments.

    python bench/memory.py                # ~2-4 min on 2 CPU cores; prints one table
    python bench/memory.py --no-deepspeed # without the DeepSpeed peer

Every configuration trains the same GPT (8 layers, width 512, ~25M parameters) for 2 steps on N
gloo processes, then counts, on each rank, the bytes of every live tensor (unique storages found by
the garbage collector) while gradients are still held (after ``step``, before ``zero_grad``), less
what the process held before the model existed. That counts whatever each system keeps, however it
keeps it (DeepSpeed's flat fp32 partitions and buffers included), without trusting anyone's own
accounting. Reported: the largest rank's bytes / parameter.

  fp32 AdamW            fp32 weights and grads, torch AdamW (fp32 m, v)                    16 expected
  bf16-mixed AdamW      bf16 weights and grads, fp32 master, torch AdamW on the master     16 expected
  Fp8AdamW              bf16 weights and grads, Fp8AdamW (e4m3 m, fp16 v, fp16 master)      9 expected
  ZeRO-1 / ZeRO-2 (ours) as Fp8AdamW, optimizer state (and, stage 2, grads) on owners only
                        ZeRO-1: 4 + 5/N, ZeRO-2: 2 + 7/N expected (bf16 weights stay replicated)
  DeepSpeed ZeRO-1 / 2  bf16, torch AdamW object: fp32 master + m + v sharded (12/N), bf16 weights;
                        its engine.step() releases the gradients itself, so none are counted for it
                        (measured 2 + 12/N exactly), while ours still hold the (owned) gradients

ZeRO rows are measured with no whole-model temporary alive. Their weight all-gather goes in buckets
of at most ``ZERO_BUCKET_BYTES`` per rank (the largest parameter here, an MLP matrix, is 2 MiB), and
each bucket's buffers have their storage released before the next bucket and before ``step``
returns, even if the gloo backend still references the finished collective. When the whole model
went in one all-gather whose buffer was merely dropped, it was sometimes still alive (held outside
Python) when this script counted: ZeRO-1 at N = 4 read 7.27 bytes/param in one run, 5.27 in the
next (+2: N x the bf16 slot, one copy of the weights).

DeepSpeed runs on CPU over gloo with a torch optimizer object (no C++ Adam) and with its
shared-memory comm op marked incompatible, so nothing is compiled (that build takes minutes here).
Target (issue): ZeRO-2 at N=4 <= 3.25 bytes/param (MS-AMP O3: FP8 weights 1 + FP8 grads 1 + 5/N).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings
from pathlib import Path

import torch

# the multi-process runner is a test fixture (tests/gloo_spawn.py), not part of the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gloo_spawn import run_on_gloo  # noqa: E402

MODEL = dict(vocab_size=256, block_size=64, n_layer=8, n_head=8, n_embd=512)
# ZeRO's bucket size (Fp8CommConfig.bucket_bytes: gradient buckets, and each rank's slot in a weight
# all-gather): well under a rank's share of the ~50 MB of bf16 weights at N = 2 and 4
ZERO_BUCKET_BYTES = 4 * 2**20


def _live_tensor_bytes() -> int:
    storages = {}
    with warnings.catch_warnings():  # scanning every object touches deprecated module attributes
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if torch.is_tensor(obj) and obj.device.type == "cpu":
                    s = obj.untyped_storage()
                    storages[s.data_ptr()] = s.nbytes()
            except Exception:  # objects that fail introspection are not ours to count
                continue
    return sum(storages.values())


def _model(dtype: torch.dtype):
    from fp8train.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(**MODEL)).to(dtype)


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randint(0, 256, (2, MODEL["block_size"] + 1), generator=gen)
    return x[:, :-1], x[:, 1:]


def _worker(rank: int, world_size: int, method: str) -> tuple[int, int]:
    """(model-state bytes on this rank, parameters)."""
    gc.collect()
    before = _live_tensor_bytes()
    if method.startswith("deepspeed"):
        return _deepspeed(rank, world_size, int(method[-1]), before)
    from fp8train.comm import Fp8CommConfig, ZeroConfig, ZeroOptimizer
    from fp8train.optim import Fp8AdamW

    dtype = torch.float32 if method == "fp32 AdamW" else torch.bfloat16
    model = _model(dtype)
    params = list(model.parameters())
    master = None
    if method == "fp32 AdamW":
        opt = torch.optim.AdamW(params)
    elif method == "bf16-mixed AdamW":
        master = [p.detach().float() for p in params]
        opt = torch.optim.AdamW(master)
    elif method == "Fp8AdamW":
        opt = Fp8AdamW(params)
    else:  # "ZeRO-s"
        comm = Fp8CommConfig(bucket_bytes=ZERO_BUCKET_BYTES)
        opt = ZeroOptimizer(model.named_parameters(), Fp8AdamW, config=ZeroConfig(stage=int(method[-1]), comm=comm))
    for step in range(2):
        _, loss = model(*_batch(rank, step))
        loss.float().backward()
        if master is not None:  # mixed precision: fp32 master takes the bf16 gradient, then writes back
            for m, p in zip(master, params):
                m.grad = p.grad.float()
            opt.step()
            for m, p in zip(master, params):
                p.data.copy_(m)
                m.grad = None  # the fp32 copy of the gradient is a step-local temporary
        else:
            opt.step()
        del loss
        if step == 0:
            opt.zero_grad(set_to_none=True)
    gc.collect()
    return _live_tensor_bytes() - before, sum(p.numel() for p in params)


def _deepspeed(rank: int, world_size: int, stage: int, before: int) -> tuple[int, int]:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_SIZE=str(world_size))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # DeepSpeed builds a shared-memory all-reduce op with the C++ compiler when it deems it
    # compatible (minutes on this machine); mark it unavailable so that gloo carries everything.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    model = _model(torch.float32)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                           config=config, dist_init_required=False)
    for step in range(2):
        _, loss = engine(*_batch(rank, step))
        engine.backward(loss)
        engine.step()
        del loss
    gc.collect()
    return _live_tensor_bytes() - before, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed peer")
    parser.add_argument("--worlds", default="2,4", help="world sizes for the sharded configurations")
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    runs = [("fp32 AdamW", 1), ("bf16-mixed AdamW", 1), ("Fp8AdamW", 1)]
    runs += [(f"ZeRO-{s} (ours)", n) for s in (1, 2) for n in worlds]
    if not args.no_deepspeed:
        runs += [(f"DeepSpeed ZeRO-{s} bf16", n) for s in (1, 2) for n in worlds]
    print(f"{'configuration':<24} | {'N':>2} | {'bytes/param (max rank)':>22} | {'vs fp32 AdamW':>13}")
    base = None
    for name, n in runs:
        method = name.split(" (")[0] if "ours" in name else ("deepspeed-" + name[-6]) if "DeepSpeed" in name else name
        results = run_on_gloo(_worker, n, method, timeout_s=900, collective_timeout_s=600)
        per_param = max(b for b, _ in results) / results[0][1]
        base = base or per_param
        print(f"{name:<24} | {n:>2} | {per_param:22.2f} | {per_param / base:12.2f}x", flush=True)
    print("\nTarget: ZeRO-2 (ours) at N=4 <= 3.25 bytes/param; MS-AMP O3 counts FP8 weights and FP8 grads.")


if __name__ == "__main__":
    main()
