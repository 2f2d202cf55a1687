"""``parallel=fsdp2``: torch's FSDP2 (``fully_shard`` per transformer block, then the root) on a 1-D device
mesh: weights, gradients and optimizer state sharded (ZeRO-3). With ``precision.grad_comm="fp8"`` FSDP2's own
collectives carry FP8 through its public custom-comm hooks (fp8train/comm/fsdp.py): gradients
reduce-scattered in FP8 with one synced scale per parameter, ``Fp8Linear`` weights all-gathered as E4M3
codes with scales agreed once per step. With ``precision.fp8_weights`` (fp8_o3) those weights are FP8 primary
weights: each shard stores 1 byte per element and FSDP2 gathers those bytes (fp8train/comm/fsdp_fp8_weights.py).
``Fp8AdamW`` steps the DTensor shards with whole-tensor scales (optim/_sharded.py). Checkpoints go through
torch.distributed.checkpoint: they reshard at any world size.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from fp8train.comm import CommStats
from fp8train.comm._agree import run_collectively
from fp8train.comm.fsdp import register_fp8_fsdp_comm
from fp8train.comm.fsdp_fp8_weights import Fp8ShardedWeights, to_fp8_weight_params_
from fp8train.optim import Fp8AdamW
from fp8train.trainer.build import build_optimizer
from fp8train.trainer.compile import transformer_blocks
from fp8train.trainer.config import TrainConfig
from fp8train.trainer.distributed import DistEnv
from fp8train.trainer.strategy import StepOutcome, clip_grad_norm

__all__ = ["FsdpStrategy"]

_DCP_DIR = "fsdp2_dcp"


def _full_float(x: torch.Tensor) -> float:
    return float(x.full_tensor() if isinstance(x, DTensor) else x)


class FsdpStrategy:
    """The ``Strategy`` of fp8train/trainer/strategy.py over FSDP2 (module docstring)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, env: DistEnv) -> None:
        self.model, self.env, self.cfg = model, env, cfg
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        blocks = transformer_blocks(model)
        if not blocks:
            raise ValueError(f"parallel=fsdp2 shards per transformer block, and model.arch={cfg.model.arch!r} has no "
                             "nn.ModuleList of blocks; allowed: gpt, llama, hf (Llama-family)")
        # FP8 primary weights (precision.fp8_weights): Fp8WeightTensor parameters, FSDP2 gathers their codes
        shards = to_fp8_weight_params_(model, env.rank, env.world_size) if cfg.precision.fp8_weights else {}
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.module = model
        self.fp8_weights = Fp8ShardedWeights(shards, mesh.get_group()) if shards else None
        fp8 = cfg.precision.grad_comm == "fp8"
        self.comm, self.gather_scales = register_fp8_fsdp_comm(
            model, env.world_size, grad_config=cfg.precision.comm if fp8 else None,
            fp8_weight_gather=fp8, group=mesh.get_group()) if fp8 else (None, None)
        names = {p: name for name, p in model.named_parameters()}
        sinks = self.fp8_weights.sinks() if self.fp8_weights is not None else None
        self.optimizer = run_collectively("FsdpStrategy: building the optimizer",
                                          lambda: build_optimizer(model.parameters(), cfg, names=names,
                                                                  fp8_weights=sinks),
                                          device=env.device)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.max_grad_norm = cfg.optim.max_grad_norm
        self.last_comm: CommStats | None = None

    @property
    def local_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer

    def accumulating(self, sync: bool) -> AbstractContextManager[Any]:
        # FSDP2 keeps the unsharded gradients of earlier micro-steps and reduce-scatters on the last one
        self.model.set_requires_gradient_sync(sync)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # FSDP2's hooks reduce-scatter each block's gradients as the backward leaves it

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def grad_log2_scales(self) -> dict[str, float]:
        """{parameter name: scaling bias of its FP8 reduce-scatter} at the last step ({} if none)."""
        return self.last_comm.log2_scales_by_name() if self.last_comm is not None else {}

    def step(self) -> StepOutcome:
        stats, weight_bytes = self.comm.pop_stats() if self.comm is not None else (None, 0)
        self.last_comm = stats
        found_inf = stats is not None and stats.found_inf  # the same on every rank (MAX-reduced amax)
        norm = None
        if not found_inf:
            grads = [p for _, p in self.named if p.grad is not None]
            total = clip_grad_norm(self.optimizer, grads, self.max_grad_norm)
            norm = _full_float(total)  # DTensor norms are reduced over the mesh: the same on every rank
            found_inf = not math.isfinite(norm)
        if isinstance(self.optimizer, Fp8AdamW):
            self.optimizer.step(found_inf=found_inf)  # clip_grad_norm gave it each gradient's exact max |g|
            found_inf = found_inf or self.optimizer.last_step_skipped  # agreed over the mesh (optim/_sharded.py)
        elif not found_inf:
            self.optimizer.step()
        if not found_inf and self.gather_scales is not None:
            self.gather_scales.refresh_()  # new weights: the next all-gathers' scales, one all_reduce
        return StepOutcome(skipped=found_inf, grad_norm=norm, comm_bytes=self._bytes(stats, weight_bytes))

    def _bytes(self, stats: CommStats | None, weight_bytes: int) -> int:
        """Bytes this rank sent: FP8 collectives as counted (FP8 primary weights: FSDP2 gathers their
        codes, 1 byte per element, through the counting all-gather); native ones as FSDP2 moves them, a
        reduce-scatter of the gradients and two all-gathers of the weights (forward, backward)."""
        if stats is not None:
            return stats.bytes_sent + weight_bytes
        n = self.env.world_size
        nbytes = sum(p.numel() * p.element_size() for _, p in self.named)
        return 3 * (n - 1) * nbytes // n

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, directory: Path) -> None:
        """Collective: model and optimizer as sharded DCP files (each rank writes its shards)."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory / _DCP_DIR))

    def load(self, directory: Path) -> None:
        """Collective: read what ``save`` wrote, at this world size (DCP reshards)."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(directory / _DCP_DIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if self.fp8_weights is not None:  # each shard was cast at its own amax: agree on the tensor's scale
            self.fp8_weights.requantize_()
        if self.gather_scales is not None:
            self.gather_scales.refresh_()

