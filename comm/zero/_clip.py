"""Gradient clipping for whole-tensor ZeRO: the global L2 norm from owned gradients only, one
collective, and torch's clip formula."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["clip_owned_grads_"]

# torch.nn.utils.clip_grad_norm_'s guard against a zero norm; kept identical so that the clipped
# gradients match torch's formula bit for bit
_CLIP_EPS = 1e-6


def clip_owned_grads_(params: Sequence[torch.nn.Parameter], owned: Sequence[int], max_norm: float,
                      group: dist.ProcessGroup | None) -> torch.Tensor:
    """Collective. Scale the gradients of ``params[i]`` for i in ``owned`` (this rank's) by
    min(1, max_norm / (norm + 1e-6)) (torch's clip_grad_norm_ formula); returns the global norm
    over every rank's owned gradients (0-d fp32, identical on every rank).

    Numerics: each owner writes the fp32 sum of squares of each owned gradient into its entry of a
    per-parameter vector (zeros elsewhere); ONE all_reduce(SUM) fills the vector, exactly (each entry
    is x + 0 + ... + 0), and every rank sums it in parameter order. The norm is therefore independent
    of the world size, the partition and the collective's reduction order, and equal bit for bit to
    a single process summing the same per-parameter fp32 sums of squares.

    A non-finite norm scales nothing (the caller skips the step, as DdpStrategy does). After the
    comm's overflow check it can only come from finite gradients whose squares overflow fp32
    (|g| > ~1.8e19). torch's clip_grad_norm_ would scale them by 0, and an optimizer step on zero
    gradients still decays the moments and applies weight decay."""
    grads = [params[i].grad for i in owned]
    sq = torch.zeros(len(params), dtype=torch.float32, device=params[0].device)
    if grads:
        sq[list(owned)] = torch.stack([g.to(torch.float32).square().sum() for g in grads])
    dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
    norm = sq.sum().sqrt()
    if not bool(torch.isfinite(norm)):  # one host read; the same verdict on every rank
        return norm
    coef = (max_norm / (norm + _CLIP_EPS)).clamp(max=1.0)
    if grads:
        torch._foreach_mul_(grads, coef)
    return norm
