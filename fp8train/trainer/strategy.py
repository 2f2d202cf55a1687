"""Data-parallel strategies behind one interface (``Strategy``): DDP (replicated optimizer) and
whole-tensor ZeRO.

Both give the loop: ``module`` (what the forward runs through), ``accumulating(sync)`` (the context
of one micro-step's forward+backward: gradients are synchronised only on the last micro-step, so the
high-precision sum of the micro-batch gradients is quantized ONCE), ``backward(loss)`` (an engine
such as DeepSpeed runs its own), ``step()`` (synchronise if not
done yet, skip on overflow, clip, update) and checkpoint I/O of their optimizer state.
"""

from __future__ import annotations

import math
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fp8train._atomic import atomic_torch_save
from fp8train.comm import (
    CommStats,
    ZeroConfig,
    ZeroOptimizer,
    load_zero_checkpoint,
    register_fp8_comm_hook,
    save_zero_checkpoint,
)
from fp8train.comm._agree import run_collectively
from fp8train.optim import Fp8AdamW
from fp8train.trainer.build import build_optimizer
from fp8train.trainer.config import TrainConfig
from fp8train.trainer.distributed import DistEnv
from fp8train.trainer.precision import fp8_weight_layers

__all__ = ["DdpStrategy", "StepOutcome", "Strategy", "ZeroStrategy", "build_strategy"]

_MODEL_FILE = "model.pt"
_OPTIM_FILE = "optim.pt"


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """skipped: overflow (inf/NaN in a gradient on some rank): no update anywhere. grad_norm: global
    L2 norm before clipping (None when not computed). comm_bytes: bytes this rank sent."""

    skipped: bool
    grad_norm: float | None
    comm_bytes: int


@runtime_checkable
class Strategy(Protocol):
    """What the loop, the step hooks and the checkpoint code call on a parallelism strategy (DDP,
    ZeRO, and any later engine). ``isinstance`` checks only that the members exist."""

    module: nn.Module  # what the forward runs through (the DDP wrapper, or the model itself)

    @property
    def local_optimizer(self) -> torch.optim.Optimizer | None:
        """This rank's optimizer (None: it owns no parameters); FP8 statistics read its state."""
        ...

    def accumulating(self, sync: bool) -> AbstractContextManager[Any]:
        """Context of one micro-step's forward+backward; ``sync``: the last one, whose gradients are synchronised."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-step's loss (already divided by the accumulation steps), inside ``accumulating``."""
        ...

    def set_lr(self, lr: float) -> None: ...

    def step(self) -> StepOutcome:
        """Synchronise gradients if not done yet, skip on overflow (on every rank), clip, update."""
        ...

    def zero_grad(self) -> None: ...

    def grad_log2_scales(self) -> dict[str, float]:
        """{parameter name: scaling bias the FP8 gradient sync used} at the last step ({} if none)."""
        ...

    def save(self, directory: Path) -> None:
        """Collective: write the model and optimizer state of a checkpoint into ``directory``."""
        ...

    def load(self, directory: Path) -> None:
        """Collective: read what ``save`` wrote."""
        ...


def clip_grad_norm(optimizer: torch.optim.Optimizer, grads: list[torch.Tensor],
                   max_grad_norm: float | None) -> torch.Tensor:
    """The total L2 norm of the gradients, clipped to ``max_grad_norm`` (None: measured only). Fp8AdamW
    folds the clip into its next step (``Fp8AdamW.clip_grad_norm_``: one read of each gradient, which
    also gives the step its exact max |g|); any other optimizer gets torch's clip_grad_norm_."""
    if isinstance(optimizer, Fp8AdamW):
        return optimizer.clip_grad_norm_(max_grad_norm or math.inf)
    return torch.nn.utils.clip_grad_norm_(grads, max_grad_norm or math.inf, foreach=True)


def _ring_all_reduce_bytes(params: list[nn.Parameter], world_size: int) -> int:
    """Bytes a rank sends in a ring all-reduce of the gradients: 2 (N-1)/N of their size."""
    nbytes = sum(p.numel() * p.element_size() for p in params)
    return 2 * (world_size - 1) * nbytes // world_size


class DdpStrategy:
    """DistributedDataParallel; with ``precision.grad_comm="fp8"`` its buckets go through the FP8
    all-reduce hook. Parameters, buffers and optimizer state are replicated; rank 0 saves them."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, env: DistEnv) -> None:
        self.model, self.env = model, env
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        # broadcast_buffers=False: FP8 scaling states are per-rank (each rank scales its own
        # activations); rank 0's would otherwise overwrite them before every forward
        with warnings.catch_warnings():
            # torch 2.13 deprecates broadcast_buffers for forward_sync_buffers, whose False still
            # syncs at init; its own message says to keep broadcast_buffers=False for rank-local buffers
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            self.module = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                                  bucket_cap_mb=cfg.parallel.ddp_bucket_mb)
        self.hook = register_fp8_comm_hook(self.module, cfg.precision.comm) if cfg.precision.grad_comm == "fp8" else None
        # one rank failing to build it (out of memory) raises on every rank, not at the first collective
        self.optimizer = run_collectively("DdpStrategy: building the optimizer",
                                          lambda: build_optimizer(model.parameters(), cfg, names=_names(model)),
                                          device=env.device)
        self.max_grad_norm = cfg.optim.max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.last_comm: CommStats | None = None  # the FP8 hook's stats of the last step

    @property
    def local_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer

    def accumulating(self, sync: bool) -> AbstractContextManager[Any]:
        return nullcontext() if sync else self.module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def grad_log2_scales(self) -> dict[str, float]:
        """{parameter name: scaling bias the FP8 gradient all-reduce used} at the last step; {} with
        native communication or after an overflow (see ``CommStats.log2_scales_by_name``)."""
        return self.last_comm.log2_scales_by_name() if self.last_comm is not None else {}

    def step(self) -> StepOutcome:
        stats = self.last_comm = self.hook.pop_stats() if self.hook is not None else None
        found_inf = stats is not None and stats.found_inf  # the same on every rank (from the MAX-reduced amax)
        norm = None
        if not found_inf:
            grads = [p for p in self.params if p.grad is not None]
            # after DDP's all-reduce every rank holds the same gradients, so the same norm and verdict
            total = clip_grad_norm(self.optimizer, grads, self.max_grad_norm)
            norm = float(total)
            found_inf = not math.isfinite(norm)
        if isinstance(self.optimizer, Fp8AdamW):
            # clip_grad_norm (above) gave the step each gradient's exact max |g| and its clip coefficient:
            # the step reads each gradient once
            self.optimizer.step(found_inf=found_inf)
            found_inf = found_inf or self.optimizer.last_step_skipped
        elif not found_inf:
            self.optimizer.step()
        comm = stats.bytes_sent if stats is not None else _ring_all_reduce_bytes(self.params, self.env.world_size)
        return StepOutcome(skipped=found_inf, grad_norm=norm, comm_bytes=comm)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, directory: Path) -> None:
        """Collective: rank 0 writes the replicated model and optimizer; a failure there (disk full)
        raises on every rank, so that none goes on to wait for rank 0 in the next collective."""

        def write() -> None:
            if self.env.is_main:
                atomic_torch_save(self.model.state_dict(), directory / _MODEL_FILE)
                atomic_torch_save(self.optimizer.state_dict(), directory / _OPTIM_FILE)

        run_collectively("DdpStrategy.save", write, device=self.env.device)

    def load(self, directory: Path) -> None:
        """Collective: every rank reads the files; a failure on any raises on every rank."""

        def read() -> None:
            device = self.env.device
            self.model.load_state_dict(torch.load(directory / _MODEL_FILE, map_location=device, weights_only=True))
            self.optimizer.load_state_dict(torch.load(directory / _OPTIM_FILE, map_location=device, weights_only=True))

        run_collectively("DdpStrategy.load", read, device=self.env.device)


class ZeroStrategy:
    """Whole-tensor ZeRO-1/2 (fp8train.comm.ZeroOptimizer): no DDP wrapper; gradients accumulate
    locally and are synchronised in FP8 (stage 2: during the last micro-step's backward, bucket by
    bucket; stage 1: in ``step``); with ``precision.fp8_weights`` the owners
    all-gather the FP8 linear weights."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, env: DistEnv, stage: int) -> None:
        self.model, self.env, self.module = model, env, model
        zero_cfg = ZeroConfig(stage=stage, comm=cfg.precision.comm, max_grad_norm=cfg.optim.max_grad_norm)
        layers = fp8_weight_layers(model)  # FP8 primary weights (precision.fp8_weights)
        by_param = {layer.weight: layer for layer in layers.values()}
        self.zero = ZeroOptimizer(model.named_parameters(),
                                  lambda owned: build_optimizer(owned, cfg, fp8_weights=by_param,
                                                                names=_names(model)),
                                  config=zero_cfg, fp8_weight_layers=layers)
        self.last_comm: CommStats | None = None  # the gradient sync's stats of the last step

    @property
    def local_optimizer(self) -> torch.optim.Optimizer | None:
        """This rank's inner optimizer (over its owned parameters; None if it owns none)."""
        return self.zero.optimizer

    def accumulating(self, sync: bool) -> AbstractContextManager[Any]:
        # earlier micro-steps accumulate locally; the last one's backward reduce-scatters bucket by
        # bucket (stage 2, ZeroConfig.overlap_grad_reduce) and step() sends whatever is left
        return self.zero.last_micro_step() if sync else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def set_lr(self, lr: float) -> None:
        if self.zero.optimizer is not None:
            for group in self.zero.optimizer.param_groups:
                group["lr"] = lr

    def grad_log2_scales(self) -> dict[str, float]:
        """{parameter name: scaling bias the FP8 gradient sync used} at the last step ({} after an overflow)."""
        return self.last_comm.log2_scales_by_name() if self.last_comm is not None else {}

    def step(self) -> StepOutcome:
        result = self.zero.step()
        self.last_comm = result.comm
        norm = float(result.grad_norm) if result.grad_norm is not None else None
        comm = result.comm.bytes_sent + getattr(result, "weight_bytes_sent", 0)
        return StepOutcome(skipped=result.skipped, grad_norm=norm, comm_bytes=comm)

    def zero_grad(self) -> None:
        self.zero.zero_grad(set_to_none=True)

    def save(self, directory: Path) -> None:
        save_zero_checkpoint(self.zero, self.model, directory)

    def load(self, directory: Path) -> None:
        load_zero_checkpoint(self.zero, self.model, directory)


def _names(model: nn.Module) -> dict[nn.Parameter, str]:
    """{parameter: its name in the model} (keys Fp8AdamW's stochastic rounding by name)."""
    return {p: name for name, p in model.named_parameters()}


def build_strategy(model: nn.Module, cfg: TrainConfig, env: DistEnv) -> Strategy:
    if not dist.is_initialized():
        raise RuntimeError("build_strategy needs a process group (see trainer.distributed.distributed_session)")
    strategy = cfg.strategy
    if strategy == "ddp":
        return DdpStrategy(model, cfg, env)
    if strategy == "fsdp2":
        from fp8train.trainer.fsdp_strategy import FsdpStrategy  # torch.distributed.fsdp: only when chosen

        return FsdpStrategy(model, cfg, env)
    if strategy == "deepspeed":
        from fp8train.trainer.deepspeed_strategy import DeepSpeedStrategy  # an optional dependency

        return DeepSpeedStrategy(model, cfg, env)
    return ZeroStrategy(model, cfg, env, stage=1 if strategy == "zero1" else 2)
