"""``parallel=deepspeed``: the DeepSpeed engine (``deepspeed.initialize``, ZeRO stage 0-3) behind the
trainer's ``Strategy``, through DeepSpeed's public API only (no subclass of its ZeRO internals, no
version pin). Imported only when ``parallel.strategy=deepspeed`` is chosen.

Engine config (``deepspeed_config``), built from the typed TrainConfig, not a JSON file:
  zero_optimization.stage   parallel.deepspeed_stage (0-3);
  bf16                      on CUDA (the tests run on CPU: this path is not exercised here); fp32 on CPU;
  gradient_clipping         optim.max_grad_norm (DeepSpeed clips, and reports the norm, except at
                            stage 0 in fp32, its plain path: there the strategy clips the all-reduced
                            gradients, as DdpStrategy does, for the norm DeepSpeed does not report);
  train_micro_batch_size_per_gpu / gradient_accumulation_steps
                            train.micro_batch_size / train.grad_accum_steps.
Nothing is compiled: the optimizer is a torch optimizer object (``build_optimizer``: Fp8AdamW or
torch AdamW), never a DeepSpeed optimizer name (FusedAdam / CPUAdam are C++ ops), and the shared-memory
all-reduce op is marked unavailable (DeepSpeed would build it for a CPU run), as bench/memory.py does.

Optimizer: DeepSpeed drives the client optimizer at every stage. Stage 0 in fp32 hands it the model's
parameters (Fp8AdamW per tensor, as under DDP: m E4M3 + v fp16 + master fp16 = 5 B/param, replicated;
torch AdamW 8 B/param). Stages 1-3 hand it one flat fp32 partition per param group (~1/N of the
parameters): Fp8AdamW then keeps one scale per partition rather than per tensor (5/N B/param; torch
AdamW 8/N), beside DeepSpeed's own fp32 partition copy (4/N B/param; Fp8AdamW's fp16 master is then
a second master), and its per-layer scale metrics are not reported (its tensors are partitions, not
layer weights).

Micro-steps: ``accumulating(sync)`` sets DeepSpeed's accumulation boundary (its public
``set_gradient_accumulation_boundary``), ``backward`` is ``engine.backward`` (ZeRO-2/3 reduce their
gradient buckets from its hooks; the loop already divided the loss by train.grad_accum_steps, so
``scale_wrt_gas=False``), and ``step`` calls ``engine.step`` once per optimizer step.

Overflow: DeepSpeed's fp32 path checks nothing at stage 0 (ZeRO stages skip on a non-finite norm in
recent versions, not in older ones), so the strategy decides before the update: a hook on every parameter
records whether a gradient this rank computed was non-finite (before DeepSpeed reduces it), and one
MAX all-reduce of that flag gives every rank the same verdict. A skipped step still runs
``engine.step`` (DeepSpeed clears its gradient buffers and counts the step) with the client
optimizer's ``step`` suppressed: weights (DeepSpeed re-gathers the unchanged partitions) and optimizer
state stay bit-identical.

comm_bytes (an estimate, the ring-algorithm volume; gloo's own algorithms may send more): with B the
gradient bytes and k = (N-1)/N, stage 0: all-reduce 2kB per step; stage 1: reduce-scatter kB + weight
all-gather kB per step; stage 2: reduce-scatter kB per micro-step (no ``no_sync`` in ZeRO-2) + kB;
stage 3: forward and backward weight all-gathers + gradient reduce-scatter, 3kB per micro-step.

Checkpoints: DeepSpeed's own ``save_checkpoint`` / ``load_checkpoint`` (collective) under
``<checkpoint>/deepspeed/``, plus ``deepspeed.json`` (stage, world size). Resuming continues bit for
bit at the same world size and stage. Another world size is refused with one line: DeepSpeed
reshards only through an offline conversion to its "universal" checkpoint (ds_to_universal.py), which
keeps fp32 Adam moments by name and knows nothing of Fp8AdamW's scaled FP8/fp16 state.

Launch: torchrun (or any launcher setting RANK/WORLD_SIZE/LOCAL_RANK); the ``deepspeed`` launcher is
not needed, and works too (launch/deepspeed.sh). A process group made without a launcher (tests) has no LOCAL_RANK, which DeepSpeed's
engine requires: the strategy then exports DistEnv.local_rank, the value a launcher would have set.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fp8train.comm._agree import run_collectively
from fp8train.errors import ConfigError
from fp8train.optim import Fp8AdamW
from fp8train.trainer.build import build_optimizer
from fp8train.trainer.config import TrainConfig
from fp8train.trainer.distributed import DistEnv
from fp8train.trainer.strategy import StepOutcome

__all__ = ["DeepSpeedStrategy", "deepspeed_config"]

_TAG = "deepspeed"  # DeepSpeed's checkpoint tag: its files go under <checkpoint>/deepspeed/
_MANIFEST = "deepspeed.json"


def _engine_clips(cfg: TrainConfig, env: DistEnv) -> bool:
    """Whether DeepSpeed clips the gradients (and reports the norm): all but its plain fp32 stage-0 path."""
    return cfg.parallel.deepspeed_stage > 0 or env.device.type == "cuda"


def deepspeed_config(cfg: TrainConfig, env: DistEnv) -> dict[str, Any]:
    """The engine's config dict (module docstring) from the typed config."""
    stage = cfg.parallel.deepspeed_stage
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": env.device.type == "cuda"},
        # a torch optimizer object is "untested" for ZeRO in DeepSpeed's eyes; Fp8AdamW is tested here
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,  # the trainer logs; DeepSpeed's progress lines would only repeat it
    }
    if _engine_clips(cfg, env) and cfg.optim.max_grad_norm is not None:
        config["gradient_clipping"] = cfg.optim.max_grad_norm
    return config


@contextmanager
def _deepspeed_calls() -> Iterator[None]:
    """Around calls into DeepSpeed: it calls torch.distributed's all_gather_into_tensor and
    reduce_scatter_tensor, which torch 2.13 deprecates with a FutureWarning per call (the calls are
    DeepSpeed's, not ours: they would only flood the run's output)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor)",
                                category=FutureWarning)
        yield


def _ring_bytes(stage: int, grad_bytes: int, world_size: int, accum: int) -> int:
    """Bytes a rank sends per optimizer step (module docstring: ring volumes)."""
    k = (world_size - 1) / world_size
    per_step = {0: 2 * k, 1: 2 * k, 2: k * (accum + 1), 3: 3 * k * accum}[stage]
    return int(per_step * grad_bytes)


class DeepSpeedStrategy:
    """The DeepSpeed engine, ZeRO stage ``parallel.deepspeed_stage``, with our client optimizer."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, env: DistEnv) -> None:
        import deepspeed  # an optional dependency (pip install fp8train[deepspeed])

        # DeepSpeed builds a shared-memory all-reduce op with the C++ compiler when it deems it
        # compatible (minutes, on a CPU run); mark it unavailable so that gloo carries everything
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))  # see the module docstring (Launch)
        self.model, self.env, self.stage = model, env, cfg.parallel.deepspeed_stage
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm = cfg.optim.max_grad_norm
        self.engine_clips = _engine_clips(cfg, env)
        names = {p: name for name, p in model.named_parameters()}
        grad_bytes = sum(p.numel() * p.element_size() for p in self.params)  # before ZeRO-3 partitions them
        self.optimizer = run_collectively("DeepSpeedStrategy: building the optimizer",
                                          lambda: build_optimizer(self.params, cfg, names=names), device=env.device)
        with _deepspeed_calls():
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                        config=deepspeed_config(cfg, env), dist_init_required=False)
        self.module = self.engine
        # this rank's verdict since the last step: did a gradient it computed hold an inf/NaN?
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=env.device)
        for p in self.params:
            p.register_hook(self._record_nonfinite)  # runs on the gradient before DeepSpeed reduces it
        self._comm_bytes = _ring_bytes(self.stage, grad_bytes, env.world_size, cfg.train.grad_accum_steps)

    def _record_nonfinite(self, grad: torch.Tensor) -> None:
        self._nonfinite.logical_or_(~torch.isfinite(grad).all())

    @property
    def local_optimizer(self) -> torch.optim.Optimizer:
        """The client optimizer (stages 1-3: over this rank's flat partitions)."""
        return self.optimizer

    def accumulating(self, sync: bool) -> AbstractContextManager[Any]:
        # DeepSpeed reduces (stage 0/1) or finishes its buckets (stage 2/3) only at the boundary
        self.engine.set_gradient_accumulation_boundary(sync)
        return _deepspeed_calls()  # ZeRO-3 gathers weights in the forward

    def backward(self, loss: torch.Tensor) -> None:
        # the loop divided by train.grad_accum_steps already: DeepSpeed must not divide again
        with _deepspeed_calls():
            self.engine.backward(loss, scale_wrt_gas=False)

    def set_lr(self, lr: float) -> None:
        # ZeRO keeps the client's group dicts (it only swaps their "params"), so this reaches the step
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def grad_log2_scales(self) -> dict[str, float]:
        """{}: DeepSpeed's collectives are native (no FP8 gradient communication)."""
        return {}

    def step(self) -> StepOutcome:
        flag = self._nonfinite.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # the same verdict on every rank
        self._nonfinite.zero_()
        found_inf, norm = bool(flag), None
        if not self.engine_clips and not found_inf:
            # stage 0, fp32: the all-reduced gradients are identical on every rank, so are norm and verdict
            grads = [p for p in self.params if p.grad is not None]
            norm = float(torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm or math.inf, foreach=True))
            found_inf = not math.isfinite(norm)
        with _deepspeed_calls(), self._client_step_skipped() if found_inf else nullcontext():
            self.engine.step()
        if self.stage == 0 and isinstance(self.optimizer, Fp8AdamW):
            found_inf = found_inf or self.optimizer.last_step_skipped  # its own check, on replicated state
        if self.engine_clips and not found_inf:
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else None
        return StepOutcome(skipped=found_inf, grad_norm=norm, comm_bytes=self._comm_bytes)

    @contextmanager
    def _client_step_skipped(self) -> Iterator[None]:
        """The client optimizer's ``step`` does nothing while DeepSpeed runs its own step around it
        (an instance attribute over our own optimizer object, removed on exit)."""
        self.optimizer.step = lambda *args, **kwargs: None  # type: ignore[method-assign]
        try:
            yield
        finally:
            del self.optimizer.step

    def zero_grad(self) -> None:
        # engine.step cleared DeepSpeed's buffers (and, at stage 0, the parameters' gradients)
        for p in self.params:
            p.grad = None

    def save(self, directory: Path) -> None:
        """Collective: DeepSpeed's checkpoint (every rank its ZeRO partition) and, by rank 0, the manifest."""
        with _deepspeed_calls():
            self.engine.save_checkpoint(str(directory), tag=_TAG, save_latest=False)

        def write() -> None:
            if self.env.is_main:
                (directory / _MANIFEST).write_text(json.dumps({"stage": self.stage,
                                                               "world_size": self.env.world_size}))

        run_collectively("DeepSpeedStrategy.save", write, device=self.env.device)

    def load(self, directory: Path) -> None:
        """Collective: what ``save`` wrote, at the same stage and world size (module docstring)."""
        saved = json.loads((directory / _MANIFEST).read_text())
        if saved != {"stage": self.stage, "world_size": self.env.world_size}:
            # short: the checkpoint loader prefixes the path and keeps 300 characters of this
            raise ConfigError(f"a DeepSpeed ZeRO-{saved['stage']} checkpoint of {saved['world_size']} processes, this run "
                              f"ZeRO-{self.stage} on {self.env.world_size}; allowed: parallel.deepspeed_stage="
                              f"{saved['stage']} on {saved['world_size']} processes (DeepSpeed reshards only offline)")
        with _deepspeed_calls():
            path, _ = self.engine.load_checkpoint(str(directory), tag=_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"no DeepSpeed state under {_TAG}/; allowed: a checkpoint saved with parallel=deepspeed")
