"""Gradient clipping for whole-tensor ZeRO: the global L2 norm from owned gradients only, one
collective, and torch's clip formula."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from fp8train.optim import Fp8AdamW
from fp8train.optim._clip import clip_coefficient

__all__ = ["clip_owned_grads_"]


def clip_owned_grads_(params: Sequence[torch.nn.Parameter], owned: Sequence[int], max_norm: float,
                      group: dist.ProcessGroup | None, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
    """Collective. Clip the gradients of ``params[i]`` for i in ``owned`` (this rank's) by
    min(1, max_norm / (norm + 1e-6)) (torch's clip_grad_norm_ formula); returns the global norm
    over every rank's owned gradients (0-d fp32, identical on every rank).

    ``optimizer``: this rank's inner optimizer (over the owned parameters, in ``owned`` order; None
    where the rank owns none). An ``Fp8AdamW`` measures its gradients and folds the coefficient into
    its next step (``Fp8AdamW.clip_grad_norm_``: one read, no write); otherwise the owned gradients
    are scaled here.

    Numerics: each owner writes the sum of squares of each owned gradient (fp32 here, float64 from
    Fp8AdamW's kernel) into its entry of a per-parameter float64 vector (zeros elsewhere); ONE
    all_reduce(SUM) fills the vector, exactly (each entry is x + 0 + ... + 0), and every rank sums it
    in parameter order. The norm is therefore independent of the world size, the partition and the
    collective's reduction order, and equal bit for bit to a single process summing the same
    per-parameter sums of squares.

    A non-finite norm scales nothing (the caller skips the step, as DdpStrategy does). After the
    comm's overflow check it can only come from finite gradients whose squares overflow
    (|g| > ~1.8e19 in fp32). torch's clip_grad_norm_ would scale them by 0, and an optimizer step on
    zero gradients still decays the moments and applies weight decay."""
    device = params[0].device

    def global_total(owned_sumsq: torch.Tensor) -> torch.Tensor:
        sq = torch.zeros(len(params), dtype=torch.float64, device=device)
        if len(owned):
            sq[list(owned)] = owned_sumsq.to(device=device, dtype=torch.float64)
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
        return sq.sum()

    if isinstance(optimizer, Fp8AdamW):
        return optimizer.clip_grad_norm_(max_norm, reduce_sumsq=global_total)
    grads = [params[i].grad for i in owned]
    owned_sumsq = torch.stack([g.to(torch.float32).square().sum() for g in grads]) if grads else torch.zeros(0)
    norm = global_total(owned_sumsq).sqrt().to(torch.float32)
    if not bool(torch.isfinite(norm)):  # one host read; the same verdict on every rank
        return norm
    if grads:
        torch._foreach_mul_(grads, clip_coefficient(norm, max_norm))
    return norm
