"""ZeRO-2's gradient reduce-scatter, bucket by bucket: all of it in ``step()``, or, with
``ZeroConfig.overlap_grad_reduce``, from post-accumulate-grad hooks during the last micro-step's
backward (docs/design.md).

Plan: fixed at construction, the same on every rank. Parameters are bucketed by
``Fp8CommConfig.bucket_bytes`` in the order their gradients are expected to be ready -- reverse
parameter order, the usual approximation of the backward's order -- or, without the hooks, in
(owner, index) order as before. Inside a bucket the tensors are sorted by (owner, index), so that
owner-aligned bounds exist and each owner receives its tensors as one chunk.

Bucket b is sent once every one of its gradients has been accumulated AND buckets 0..b-1 have been
sent: every rank issues the same collectives in the same order, whatever order its hooks fire in (a
bucket that completes early waits for its predecessors). A bucket that never completes in the
backward (a parameter without a gradient, a backward outside ``last_micro_step``) is sent by
``finish`` in ``step()``, in plan order, a missing gradient as NaN (ZeroOptimizer.step). A rank that
sent bucket b in its backward waits there, inside the collective, for a rank that sends it in
``step()``; nothing else may issue a collective on the group in between (the trainer issues none).

Sending a bucket: ``fp8_reduce_scatter(requantize=True)``; owners copy the mean into their gradients,
the non-owned gradients are freed (``.grad = None``) and the bucket's temporaries die with the call,
so during the backward a rank holds its owned gradients, the bucket being filled and the one being
sent. On gloo each bucket's collectives block the backward while they run (no compute overlaps the
transfer); what the hooks buy is memory.

Numerics: identical to sending every bucket in ``step()``, bit for bit, whatever the buckets: each
tensor's scale comes from ITS amax, MAX-reduced over ranks (``_sync_log2_scales``: one entry per
tensor), and the mean is taken element by element (rank order 0..N-1, requantized with that scale).
Overflow: the first bucket whose MAX-reduced amax is inf stops the sending on every rank (the same
verdict everywhere); ``step()`` then skips.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.distributed as dist

from fp8train.comm._layout import FlatLayout, plan_buckets
from fp8train.comm.allreduce import fp8_reduce_scatter
from fp8train.comm.config import Fp8CommConfig
from fp8train.comm.stats import CommStats

__all__ = ["GradReduceScatter"]


class GradReduceScatter:
    """Stage 2's gradients to their owners. ``in_backward``: register the hooks (armed by ``arm``)
    and plan in reverse parameter order; otherwise everything goes in ``finish``."""

    def __init__(self, names: Sequence[str], params: Sequence[torch.nn.Parameter], owner: Sequence[int], *,
                 rank: int, world_size: int, group: dist.ProcessGroup | None, config: Fp8CommConfig,
                 in_backward: bool) -> None:
        self.names, self.params, self.owner = list(names), list(params), list(owner)
        self.rank, self.world_size, self.group, self.config = rank, world_size, group, config
        n = len(self.params)
        order = list(reversed(range(n))) if in_backward else sorted(range(n), key=lambda i: (owner[i], i))
        by_owner = functools.partial(sorted, key=lambda i: (self.owner[i], i))
        self.plan = [by_owner(order[j] for j in bucket)
                     for bucket in plan_buckets([self.params[i] for i in order], config.bucket_bytes)]
        self._bucket_of = {i: b for b, bucket in enumerate(self.plan) for i in bucket}  # empty tensors: none
        self._handles = [p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, i))
                         for i, p in enumerate(self.params)] if in_backward else []
        self.reset()

    def reset(self) -> None:
        """Forget the step in progress (``zero_grad``; after ``finish``)."""
        self._armed = False
        self._quant_stats = False
        self._ready = [0] * len(self.plan)  # accumulated gradients per bucket
        self._seen: set[int] = set()
        self._next = 0  # the next bucket to send; 0..next-1 are sent
        self._found_inf = False
        self._stats = CommStats()

    @property
    def sent_buckets(self) -> int:
        """Buckets sent since the last ``reset`` (introspection, tests)."""
        return self._next

    def arm(self, quant_stats: bool) -> None:
        if not self._handles:
            return
        if self._next > 0:
            raise RuntimeError("ZeroOptimizer.last_micro_step: entered again before step(); gradients already "
                               "sent cannot take another micro-step (call step() or zero_grad() first)")
        self._armed, self._quant_stats = True, quant_stats

    def disarm(self) -> None:
        self._armed = False

    @torch.no_grad()
    def _on_grad(self, i: int, param: torch.nn.Parameter) -> None:
        """Post-accumulate-grad hook of ``params[i]``: count it ready, send what is complete in order."""
        if not self._armed or i not in self._bucket_of:
            return
        b = self._bucket_of[i]
        if i in self._seen:
            if b < self._next:
                raise RuntimeError(f"ZeroOptimizer: parameter {self.names[i]!r} accumulated a gradient again after "
                                   "its bucket was reduce-scattered; run one backward per last_micro_step()")
            return
        self._seen.add(i)
        self._ready[b] += 1
        while (self._next < len(self.plan) and not self._found_inf
               and self._ready[self._next] == len(self.plan[self._next])):
            self._send([self.params[j].grad for j in self.plan[self._next]], self._quant_stats)

    def finish(self, quant_stats: bool) -> tuple[CommStats, list[str]]:
        """In ``step()``: send the buckets not sent yet (a missing gradient as NaN), free every
        non-owned gradient; returns the merged stats and the names of the missing gradients."""
        for p in self.params:  # an empty parameter has nothing to send: a missing gradient is zeros
            if p.grad is None and p.numel() == 0:
                p.grad = torch.zeros_like(p)
        unsent = sorted(i for bucket in self.plan[self._next:] for i in bucket)  # in parameter order
        missing = [self.names[i] for i in unsent if self.params[i].grad is None]
        while self._next < len(self.plan) and not self._found_inf:
            grads = [self.params[i].grad for i in self.plan[self._next]]
            grads = [g if g is not None else torch.full_like(p, float("nan"))
                     for g, p in zip(grads, (self.params[i] for i in self.plan[self._next]))]
            self._send(grads, quant_stats)
        for i, p in enumerate(self.params):
            if self.owner[i] != self.rank:
                p.grad = None
        stats = self._stats
        self.reset()
        return stats, missing

    def _send(self, grads: list[torch.Tensor], quant_stats: bool) -> None:
        """Reduce-scatter bucket ``_next`` (its gradients ``grads``, in plan order) and advance."""
        bucket = self.plan[self._next]
        self._next += 1
        owners = [self.owner[i] for i in bucket]
        bounds = FlatLayout.of(grads).owner_bounds(owners, self.world_size)
        assert bounds is not None  # each bucket is sorted by owner
        chunk, stats = fp8_reduce_scatter(grads, bounds, config=self.config, group=self.group,
                                          quant_stats=quant_stats, requantize=True)
        stats.tensor_names = tuple(self.names[i] for i in bucket)
        self._stats = self._stats.merge(stats)
        if stats.found_inf:  # the same verdict on every rank: all stop sending here
            self._found_inf = True
            return
        pos = 0
        for i, g in zip(bucket, grads):
            if self.owner[i] == self.rank:  # the chunk is this rank's tensors end to end, in bucket order
                # fp32 FP8 value times a power-of-two scale_inv: exact in the gradient's dtype, save
                # a mean E4M3-rounded past the dtype's max, which fp8_reduce_scatter saturated
                g.copy_(chunk[pos:pos + g.numel()].view(g.shape))
                pos += g.numel()
            else:
                self.params[i].grad = None  # sent: the owner has it now
