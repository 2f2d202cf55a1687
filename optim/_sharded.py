"""Fp8AdamW on sharded parameters (``DTensor``, e.g. FSDP2's ``fully_shard``): each rank steps its local
shard, and the per-tensor scales stay those of the WHOLE tensor.

Numerical decision: a scale per shard would be finer, but the state could then not be resharded (a
checkpoint loaded at another world size would mix elements stored at different scales under one
scale). So the ranks agree instead, with two small MAX all_reduces per step over the tensors' scalars:
  - before the store pass, the upper bounds of the new amaxes (or the exact amaxes of a two-pass step;
    inf where a rank's gradient is non-finite): the MAX of per-shard upper bounds bounds the whole
    tensor, so every rank stores with the same scales, and every rank skips a step that any rank must;
  - after it, the per-tensor records of the next bounds (``_bounds.RECORD``: maxima and the identical
    coefficients), so that they too describe the whole tensor and a checkpoint of them is valid on any
    rank and at any world size.
The large states (m, v, master) are DTensors with the parameter's layout, so torch.distributed.checkpoint
saves and reshards them; the step reads their local shards. Per-tensor scalars are plain tensors,
identical on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

__all__ = ["like_param", "local", "shard_group", "sync_max_", "sync_sum_"]


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing its storage); any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def like_param(state: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``state`` (built from ``local(p)``) as a DTensor laid out like ``p``, if ``p`` is one."""
    if not isinstance(p, DTensor):
        return state
    return DTensor.from_local(state, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)


def shard_group(params: Sequence[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group the parameters are sharded over (None: none is a DTensor). Only 1-D meshes:
    the per-tensor agreement is over every rank that holds a piece of the tensor."""
    meshes = {id(p.device_mesh): p.device_mesh for p in params if isinstance(p, DTensor)}
    if not meshes:
        return None
    if len(meshes) > 1 or next(iter(meshes.values())).ndim != 1:
        raise ValueError("Fp8AdamW: sharded parameters must all live on one 1-D device mesh; allowed: the "
                         "mesh of fully_shard(model, mesh=init_device_mesh(device, (world_size,)))")
    return next(iter(meshes.values())).get_group()


def sync_max_(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Elementwise MAX over the ranks of ``group``, in place, in ONE all_reduce for all of them
    (fp32; NaN made inf first, so that a NaN anywhere cannot be lost by MAX)."""
    if group is None or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
    flat = torch.where(torch.isnan(flat), torch.full_like(flat, float("inf")), flat)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view(t.shape))


def sync_sum_(values: torch.Tensor, group: dist.ProcessGroup | None, device: torch.device | None) -> None:
    """Elementwise SUM over the ranks of ``group``, in place, in one all_reduce on ``device`` (the
    parameters', so that NCCL gets a CUDA tensor): the per-tensor sums of the shards' squares."""
    if group is None:
        return
    on_device = values.to(device)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM, group=group)
    values.copy_(on_device.to(values.device))
