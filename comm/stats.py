"""``CommStats``: what one FP8 gradient synchronisation did, for logs and dashboards."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["CommStats"]


@dataclass(kw_only=True, slots=True)
class CommStats:
    """Per call (or merged over the buckets of a step) on this rank.

    bytes_sent / bytes_received: payload bytes this rank puts on / takes off the wire, counted as a
                  ring or pairwise exchange moves them (all-to-all and all-gather: the chunks of the
                  other N-1 ranks; all-reduce of k bytes: 2 (N-1)/N k each way).
    collectives:  collective calls issued; amax_syncs: how many of them were the amax MAX all-reduce.
    elements:     gradient elements synchronised.
    log2_scales:  (tensors,) fp32 shared scaling bias of each tensor (identical on every rank).
    tensor_names: the name of each entry of ``log2_scales`` where the caller knows it (parameter
                  names: ``ZeroOptimizer``, the DDP hook), else (); see ``log2_scales_by_name``.
    grad_amax:    (tensors,) fp32 upper bound of max |g| of each synchronised gradient, from its shared
                  scale alone (comm/allreduce.py, ``synced_grad_amax``): what ``Fp8AdamW.step(grad_amax=)``
                  takes instead of reading every gradient once more; see ``grad_amax_by_name``.
    saturated / underflowed: elements clamped to the format's max / flushed to 0 when quantizing
                  this rank's gradients; None when not sampled on this call (``stats_every``).
    found_inf:    some rank had an inf or NaN gradient: every rank reports it, the gradients were
                  left as they were, and the caller must skip the optimizer step.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0
    amax_syncs: int = 0
    elements: int = 0
    log2_scales: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    tensor_names: tuple[str, ...] = ()
    grad_amax: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    saturated: int | None = None
    underflowed: int | None = None
    found_inf: bool = False

    def merge(self, other: CommStats) -> CommStats:
        """The stats of two calls (e.g. two buckets of one step) as one record."""

        def add(a: int | None, b: int | None) -> int | None:
            return None if a is None and b is None else (a or 0) + (b or 0)

        return CommStats(
            bytes_sent=self.bytes_sent + other.bytes_sent, bytes_received=self.bytes_received + other.bytes_received,
            collectives=self.collectives + other.collectives, amax_syncs=self.amax_syncs + other.amax_syncs,
            elements=self.elements + other.elements,
            log2_scales=torch.cat([self.log2_scales, other.log2_scales]),
            grad_amax=torch.cat([self.grad_amax, other.grad_amax]),
            # names only while every part has them: a partial list could not be matched to the scales
            tensor_names=self.tensor_names + other.tensor_names if self._named() and other._named() else (),
            saturated=add(self.saturated, other.saturated), underflowed=add(self.underflowed, other.underflowed),
            found_inf=self.found_inf or other.found_inf,
        )

    def _named(self) -> bool:
        return len(self.tensor_names) == self.log2_scales.numel()

    def log2_scales_by_name(self) -> dict[str, float]:
        """{tensor name: the scaling bias its synchronisation used}; {} when the names are unknown or
        on overflow (``found_inf``: the overflowing buckets were not sent, their biases mean nothing)."""
        if self.found_inf or not self._named():
            return {}
        return dict(zip(self.tensor_names, self.log2_scales.tolist()))

    def grad_amax_by_name(self) -> dict[str, torch.Tensor]:
        """{tensor name: 0-d fp32 upper bound of max |g| after the synchronisation}; {} when the names
        are unknown or on overflow (the gradients were not synchronised)."""
        if self.found_inf or not self._named() or self.grad_amax.numel() != self.log2_scales.numel():
            return {}
        return dict(zip(self.tensor_names, self.grad_amax.unbind(0)))

    @property
    def wire_bytes_per_element(self) -> float:
        """Bytes sent per synchronised element (FP8 all-reduce: 2 (N-1)/N plus the amax vector)."""
        return self.bytes_sent / self.elements if self.elements else 0.0
