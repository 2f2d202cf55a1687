"""Model-state memory per parameter per rank: weights + gradients + master + optimizer moments.

    python bench/memory.py                # ~3-5 min on 2 CPU cores; prints one table
    python bench/memory.py --no-deepspeed # without the DeepSpeed peer

Every configuration trains the same GPT (8 layers, width 512, ~25M parameters) for 2 steps on N
gloo processes (one micro-step per step), then counts, on each rank, the bytes of every live tensor
(unique storages found by the garbage collector) while gradients are still held (after ``step``,
before ``zero_grad``), less what the process held before the model existed. That counts whatever
each system keeps, however it keeps it (DeepSpeed's flat fp32 partitions and buffers included),
without trusting anyone's own accounting. Reported: the largest rank's bytes / parameter.

Peak (second column): the most bytes live at a sample point of the second step's backward and
optimizer step, on the same footing. Sample points (``_PeakSampler``): before and after each
``torch.distributed`` collective (a bucket's buffers are live then; wrapped in the worker process
only), and at the end of the step. Activations are EXCLUDED: storages the forward created (saved
tensors, logits, loss) are left out. Not seen: tensors only C++ holds (autograd's activation
gradients in flight) and the optimizer's temporaries inside its step (no sample point there).
"backward peak": the same up to the end of the backward; "peak at": where the largest rank's peak was.
(A TorchDispatchMode tracker would see every allocation, but it disables fp8train/_decode_cpu.py's loop.)

  fp32 AdamW            fp32 weights and grads, torch AdamW (fp32 m, v)                    16 expected
  bf16-mixed AdamW      bf16 weights and grads, fp32 master, torch AdamW on the master     16 expected
  Fp8AdamW              bf16 weights and grads, Fp8AdamW (e4m3 m, fp16 v, fp16 master)      9 expected
  ZeRO-1 / ZeRO-2 (ours) as Fp8AdamW, optimizer state (and, stage 2, grads) on owners only
                        ZeRO-1: 4 + 5/N, ZeRO-2: 2 + 7/N expected (bf16 weights stay replicated)
  DeepSpeed ZeRO-1 / 2  bf16, torch AdamW object: fp32 master + m + v sharded (12/N), bf16 weights;
                        its engine.step() releases the gradients itself, so none are counted for it
                        (measured 2 + 12/N exactly), while ours still hold the (owned) gradients.
                        Buckets sized like ours (DEEPSPEED_BUCKET_ELEMENTS; its 5e8 default read 46-49 peaks)
  Fp8AdamW + FP8 weights as Fp8AdamW, the linear layers storing E4M3 weights (1 byte; fp8_o3's), the
                        master only in Fp8AdamW; the step frees those gradients: ~6 expected
                        (the embeddings, norms and biases, 0.6 % of the parameters, keep 9)
  fsdp2 + FP8           ours, parallel=fsdp2, fp8_o2 (FP8 reduce-scatter and weight gather, Fp8AdamW on shards):
                        9/N expected (weight 2 + master 2 + m 1 + v 2 + grad 2), + one gathered block at the peak
  fsdp2 + FP8 + FP8 weights  the same with fp8_o3's FP8 primary weights (1-byte Fp8WeightTensor shards):
                        issue 17's target 8/N, + one FP8 block at the peak
  DeepSpeed ZeRO-3      bf16, torch AdamW object: all sharded, 16/N expected (weights 2, fp32 master + m + v 12,
                        its bf16 gradient partition 2, held after step()) + its gradient buffer, one bucket
                        allocated at initialize (the 5e8-element default read 43-47 bytes/param). No peak: the
                        weights it gathers in the forward count as activations, its collectives bypass hooks;
                        "+ FP8": our Fp8Linear layers and Fp8AdamW as its client optimizer (measured only)
  ZeRO-2 + FP8 weights  ours, as fp8_o3: 1 + 5/N expected between steps (+ owned bf16 grads until step)
  ZeRO-2, in step()     ours with ``overlap_grad_reduce=False``: the whole reduce-scatter in step(), so the
                        backward ends holding every gradient (peak ~ 2 + 2 + 5/N + temporaries); the default
                        frees non-owned gradients bucket by bucket (backward peak ~ between-steps + 2 buckets)

ZeRO's weight all-gather goes in buckets of at most ``ZERO_BUCKET_BYTES`` per rank, each released before
the next and before ``step`` returns (a merely dropped whole-model buffer was sometimes still counted).

DeepSpeed runs with a torch optimizer object and its shm comm op marked incompatible: nothing is compiled.
Targets: each row's expected bytes/param between steps (above); our ZeRO rows' peak: that + one bucket.
ZeRO-2 with FP8 weights at N=4: <= 3.25 between steps (MS-AMP O3: FP8 weights 1 + FP8 grads 1 + 5/N).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings
import weakref
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

# the multi-process runner is a test fixture (tests/gloo_spawn.py), not part of the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _timing import verdict  # noqa: E402
from gloo_spawn import run_on_gloo  # noqa: E402

MODEL = dict(vocab_size=256, block_size=64, n_layer=8, n_head=8, n_embd=512)
# ZeRO's bucket size (Fp8CommConfig.bucket_bytes: gradient buckets, and each rank's slot in a weight
# all-gather): well under a rank's share of the ~50 MB of bf16 weights at N = 2 and 4
ZERO_BUCKET_BYTES = 4 * 2**20
DEEPSPEED_BUCKET_ELEMENTS = ZERO_BUCKET_BYTES // 4  # DeepSpeed's bucket sizes count elements
FP8_WEIGHTS = " + FP8 weights"  # a configuration named so has FP8 primary weights in its linear layers (fp8_o3's)
FSDP2 = "fsdp2 + FP8"


def _block_bytes(fp8_weights: bool) -> int:
    """One transformer block's weights as FSDP2 gathers them (it holds about one block unsharded): bf16,
    the linear weights' 12 d^2 in 1 byte with FP8 primary weights."""
    d = MODEL["n_embd"]
    return (1 if fp8_weights else 2) * 12 * d * d + 2 * 13 * d  # attention 4 d^2 + 4 d, MLP 8 d^2 + 5 d, norms 4 d


def _live_storages() -> dict[int, torch.UntypedStorage]:
    """{data_ptr: storage} of every CPU tensor the garbage collector finds."""
    storages = {}
    with warnings.catch_warnings():  # scanning every object touches deprecated module attributes
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if torch.is_tensor(obj) and obj.device.type == "cpu":
                    s = obj.untyped_storage()
                    storages[s.data_ptr()] = s
            except Exception:  # objects that fail introspection are not ours to count
                continue
    return storages


def _live_tensor_bytes() -> int:
    return sum(s.nbytes() for s in _live_storages().values())


# the collectives the peak sampler wraps (those present in this torch): every gradient and weight
# exchange of ours and of DeepSpeed goes through one of them
# (not isend / irecv: P2POp checks its op is the original function; batch_isend_irecv is wrapped)
_COLLECTIVES = ("all_reduce", "all_to_all_single", "batch_isend_irecv", "all_gather_into_tensor",
                "all_gather_single", "all_gather", "reduce_scatter_tensor", "reduce_scatter", "broadcast",
                "reduce")


class _PeakSampler:
    """The peak of live CPU storage bytes (gc-visible tensors plus every ``.grad``) over sample
    points between ``end_forward`` and ``stop``, less the storages created by the forward
    (activations); see the module docstring. A context: wraps ``torch.distributed``'s collectives
    (sampled before and after each) while open, in this worker process only."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params, self.peak, self.samples, self._active = params, 0, 0, False
        self._activations: dict[int, weakref.ref] = {}
        self._before_forward: set[int] = set()
        self._saved: dict[str, object] = {}
        self.peak_at = ""
        self.backward_peak = 0  # the peak over the samples up to the end of the backward
        self._in_backward = False

    def __enter__(self) -> "_PeakSampler":
        for name in _COLLECTIVES:
            if hasattr(dist, name):
                self._saved[name] = fn = getattr(dist, name)
                setattr(dist, name, self._sampled(fn))
        self._before_forward = set(_live_storages())
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample("end of step")
        self._active = False
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _sampled(self, fn):
        def wrapper(*args, **kwargs):
            self.sample(f"before {fn.__name__}")  # the bucket's buffers are live in the caller
            out = fn(*args, **kwargs)
            self.sample(f"after {fn.__name__}")
            return out
        return wrapper

    def end_forward(self) -> None:
        self._activations = {k: weakref.ref(s) for k, s in _live_storages().items() if k not in self._before_forward}
        self._active = self._in_backward = True
        self.sample("end of forward")

    def end_backward(self) -> None:
        self.sample("end of backward")
        self._in_backward = False

    def sample(self, where: str) -> None:
        if not self._active:
            return
        storages = _live_storages()
        for p in self.params:
            if p.grad is not None:  # a gradient autograd made has no Python object until someone asks
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # a DTensor: its shard
                storage = grad.untyped_storage()
                storages[storage.data_ptr()] = storage
        live = sum(s.nbytes() for k, s in storages.items()
                   if not (k in self._activations and self._activations[k]() is s))
        if live > self.peak:
            self.peak, self.peak_at = live, where
        if self._in_backward:
            self.backward_peak = max(self.backward_peak, live)
        self.samples += 1


def _model(dtype: torch.dtype):
    from fp8train.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(**MODEL)).to(dtype)


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randint(0, 256, (2, MODEL["block_size"] + 1), generator=gen)
    return x[:, :-1], x[:, 1:]


def _fp8_weight_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Converts ``model``'s linear layers to FP8 primary weights; {parameter name: layer}."""
    from fp8train import Fp8Linear, convert_to_fp8

    convert_to_fp8(model, fp8_weights=True)
    return {f"{fqn}.weight": m for fqn, m in model.named_modules() if isinstance(m, Fp8Linear)}


def _optimizer(method: str, model: torch.nn.Module):
    """(optimizer, fp32 master copies or None, the last micro-step's context factory)."""
    from fp8train.comm import Fp8CommConfig, ZeroConfig, ZeroOptimizer
    from fp8train.optim import Fp8AdamW

    params = list(model.parameters())
    layers = _fp8_weight_layers(model) if method.endswith(FP8_WEIGHTS) else {}
    by_param = {m.weight: m for m in layers.values()}
    if method == "fp32 AdamW":
        return torch.optim.AdamW(params), None, nullcontext
    if method == "bf16-mixed AdamW":
        master = [p.detach().float() for p in params]
        return torch.optim.AdamW(master), master, nullcontext
    if method.startswith("Fp8AdamW"):
        return Fp8AdamW(params, fp8_weights=by_param), None, nullcontext
    if method.startswith(FSDP2):
        return _fsdp2(model, fp8_weights=bool(layers)), None, nullcontext
    # "ZeRO-1", "ZeRO-2" (reduce-scatter from the backward), "ZeRO-2 in step", "ZeRO-2 + FP8 weights"
    config = ZeroConfig(stage=int(method[5]), comm=Fp8CommConfig(bucket_bytes=ZERO_BUCKET_BYTES),
                        overlap_grad_reduce=not method.endswith("in step"))
    zero = ZeroOptimizer(model.named_parameters(),
                         lambda owned: Fp8AdamW(owned, fp8_weights={p: by_param[p] for p in owned if p in by_param}),
                         config=config, fp8_weight_layers=layers)
    return zero, None, zero.last_micro_step


def _fsdp2(model: torch.nn.Module, fp8_weights: bool) -> torch.optim.Optimizer:
    """parallel=fsdp2 with fp8_o2's precision: Fp8Linear layers, fully_shard per block and the root, FP8
    gradient reduce-scatter and FP8 weight all-gather (fp8train/comm/fsdp.py), Fp8AdamW on the shards;
    ``fp8_weights`` (layers converted by the caller): fp8_o3's, FP8 primary weights as FSDP2 shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fp8train import convert_to_fp8
    from fp8train.comm import Fp8CommConfig
    from fp8train.comm.fsdp import register_fp8_fsdp_comm
    from fp8train.comm.fsdp_fp8_weights import Fp8ShardedWeights, to_fp8_weight_params_
    from fp8train.optim import Fp8AdamW

    if not fp8_weights:
        convert_to_fp8(model)
    shards = to_fp8_weight_params_(model, dist.get_rank(), dist.get_world_size())
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fp8_fsdp_comm(model, dist.get_world_size(), grad_config=Fp8CommConfig(), fp8_weight_gather=True)
    sinks = Fp8ShardedWeights(shards, mesh.get_group()).sinks() if shards else None
    return Fp8AdamW(model.parameters(), fp8_weights=sinks)


def _worker(rank: int, world_size: int, method: str) -> tuple[int, int, int, int, str]:
    """(model-state bytes on this rank between steps, at the peak of a step, at the peak of its
    backward, parameters, where the step's peak was sampled)."""
    gc.collect()
    before = _live_tensor_bytes()
    if method.startswith("deepspeed"):
        return _deepspeed(rank, world_size, int(method[len("deepspeed-")]), before, fp8=method.endswith("fp8"))
    model = _model(torch.float32 if method == "fp32 AdamW" else torch.bfloat16)
    opt, master, last_micro_step = _optimizer(method, model)
    params = list(model.parameters())  # after _optimizer: fully_shard replaces them by DTensors
    sampler = _PeakSampler(params)
    for step in range(2):
        with sampler if step == 1 else nullcontext():  # the second step: every buffer exists
            with last_micro_step():
                _, loss = model(*_batch(rank, step))
                if step == 1:
                    sampler.end_forward()
                loss.float().backward()
                if step == 1:
                    sampler.end_backward()
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
    return (_live_tensor_bytes() - before, sampler.peak - before, sampler.backward_peak - before,
            sum(p.numel() for p in params), sampler.peak_at)


def _deepspeed(rank: int, world_size: int, stage: int, before: int, fp8: bool) -> tuple[int, int, int, int, str]:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_SIZE=str(world_size))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # DeepSpeed builds a shared-memory all-reduce op with the C++ compiler when it deems it
    # compatible (minutes on this machine); mark it unavailable so that gloo carries everything.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    model = _model(torch.float32)
    # buckets like ours (ZeRO-3's 5e8-element default buffer is ~40 bytes/param here); persistence threshold 0:
    # ZeRO-3 shards every parameter, as fsdp2 does (by default those under 1e5 elements stay whole on every rank)
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0,
            **dict.fromkeys(("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"),
                            DEEPSPEED_BUCKET_ELEMENTS)}
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": zero, "steps_per_print": 10**9}
    if fp8:  # our FP8 GEMMs and Fp8AdamW as DeepSpeed's client optimizer (it keeps its own fp32 partitions)
        from fp8train import convert_to_fp8
        from fp8train.optim import Fp8AdamW

        convert_to_fp8(model)
        optimizer = Fp8AdamW(model.parameters())
        config["zero_allow_untested_optimizer"] = True  # DeepSpeed's word for "not one of its own Adams"
    else:
        optimizer = torch.optim.AdamW(model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    sampler = _PeakSampler(list(model.parameters()))
    for step in range(2):
        with sampler if step == 1 else nullcontext():
            _, loss = engine(*_batch(rank, step))
            if step == 1:
                sampler.end_forward()
            engine.backward(loss)
            if step == 1:
                sampler.end_backward()
            engine.step()
            del loss
    gc.collect()
    # ZeRO-3 leaves each parameter an empty placeholder: its full size is ds_numel
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return _live_tensor_bytes() - before, sampler.peak - before, sampler.backward_peak - before, n_params, sampler.peak_at


# what the expected bytes/param leave out: per-tensor scalars (Fp8AdamW: 16 bytes per parameter
# tensor, ~0.0003 bytes/param here), the RNG and batch tensors, allocator rounding
TARGET_SLACK = 0.05


def _targets(method: str, n: int, bucket_per_param: float,
             block_per_param: float) -> tuple[float | None, float | None]:
    """(between-steps, peak) targets in bytes/param (see the module docstring)."""
    if method == "deepspeed-3-fp8":  # measured, not predicted: what DeepSpeed keeps beside a client optimizer
        return None, None
    between = TARGET_SLACK + {"fp32 AdamW": 16.0, "bf16-mixed AdamW": 16.0, "Fp8AdamW": 9.0, "ZeRO-1": 4 + 5 / n,
                              "ZeRO-2": 2 + 7 / n, "ZeRO-2 in step": 2 + 7 / n, "deepspeed-1": 2 + 12 / n,
                              "deepspeed-2": 2 + 12 / n, "Fp8AdamW" + FP8_WEIGHTS: 6.0,
                              "ZeRO-2" + FP8_WEIGHTS: 1 + 5 / n, FSDP2: 9 / n, FSDP2 + FP8_WEIGHTS: 8 / n,
                              "deepspeed-3": 16 / n}[method]
    if method == "ZeRO-2" + FP8_WEIGHTS and n == 4:
        between = 3.25  # the target (MS-AMP O3: FP8 weights 1 + FP8 grads 1 + 5/N), no slack
    if method == "deepspeed-3":  # + its gradient buffer: DEEPSPEED_BUCKET_ELEMENTS in bf16, half our fp32 bucket
        between += bucket_per_param / 2
    if method.startswith(FSDP2):  # issue 17's with FP8 weights: (1 + master 2 + m 1 + v 2 + grad 2) / N, + a block
        return between, between + block_per_param
    peak = between + bucket_per_param if method.startswith("ZeRO") else None
    return between, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed peer")
    parser.add_argument("--worlds", default="2,4", help="world sizes for the sharded configurations")
    parser.add_argument("--only", default=None, help="comma-separated substrings: run only configurations naming one")
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    runs = [(m, m, 1) for m in ("fp32 AdamW", "bf16-mixed AdamW", "Fp8AdamW", "Fp8AdamW" + FP8_WEIGHTS)]
    runs += [(f"{m} (ours)", m, n) for m in ("ZeRO-1", "ZeRO-2", "ZeRO-2 in step", "ZeRO-2" + FP8_WEIGHTS)
             for n in worlds]
    runs += [(f"{m} (ours)", m, n) for m in (FSDP2, FSDP2 + FP8_WEIGHTS) for n in worlds]
    if not args.no_deepspeed:
        runs += [(f"DeepSpeed ZeRO-{s} bf16", f"deepspeed-{s}", n) for s in (1, 2, 3) for n in worlds]
        runs += [("DeepSpeed ZeRO-3 + FP8", "deepspeed-3-fp8", n) for n in worlds]
    if args.only:
        runs = [r for r in runs if any(key in r[0] for key in args.only.split(","))]
    print(f"{'configuration':<34} | {'N':>2} | {'bytes/param between steps':>25} | {'peak in step':>12} | "
          f"{'peak at (max rank)':<26} | {'backward peak':>13} | {'vs fp32 AdamW':>13} | {'target between':<18} | "
          "target peak")
    base = None
    for name, method, n in runs:
        results = run_on_gloo(_worker, n, method, timeout_s=900, collective_timeout_s=600)
        n_params = results[0][3]
        between, peak, backward_peak = (max(r[k] for r in results) / n_params for k in (0, 1, 2))
        peak_at = max(results, key=lambda r: r[1])[4]
        base = base or between
        target_between, target_peak = _targets(method, n, ZERO_BUCKET_BYTES / n_params,
                                               _block_bytes(method.endswith(FP8_WEIGHTS)) / n_params)
        # ZeRO-3's peak is not seen by the sampler (module docstring), so none is claimed for it
        trusted = not method.startswith("deepspeed-3")
        peaks = (f"{peak:12.2f} | {peak_at:<26} | {backward_peak:13.2f}" if trusted
                 else f"{'-':>12} | {'(not measured)':<26} | {'-':>13}")
        print(f"{name:<34} | {n:>2} | {between:25.2f} | {peaks} | {between / base:12.2f}x | "
              f"{verdict(between, target_between, at_most=True):<18} | {verdict(peak, target_peak, at_most=True)}",
              flush=True)
    print(f"\nOne gradient bucket: {ZERO_BUCKET_BYTES / n_params:.2f} bytes/param. Issue's target: ZeRO-2 + FP8 "
          "weights (ours, fp8_o3) at N=4 <= 3.25 bytes/param between steps and <= 3.25 + one bucket at the peak; "
          "MS-AMP O3 counts FP8 weights and FP8 grads.")


if __name__ == "__main__":
    main()
