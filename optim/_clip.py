"""Gradient-norm clipping folded into Fp8AdamW's step (``Fp8AdamW.clip_grad_norm_``).

``torch.nn.utils.clip_grad_norm_`` reads every gradient for the norm, then reads and writes every
gradient again to scale it; the optimizer's step then reads it a third time (and Fp8AdamW, without a
caller's bound, a fourth for max |g|). Here one read gives both each tensor's sum of squares and its
max |g| (``csrc/fp8adamw_gradstats.h``), and nothing is written: the clip coefficient c waits in a
``PendingClip`` until the next step multiplies it into every gradient it decodes (``grad_mul``), with
max |g| x c as that step's exact ``grad_amax``. Per element the step sees fl(g x c), the fp32 value
torch's clip would have stored for an fp32 gradient (for a bf16 one torch would round it to bf16
again), and fl(max |g| x c) = max |fl(g x c)| (rounding is monotone), so the step's scales and
results are those of clipping the gradients first, bit for bit, given the same norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CLIP_EPS", "PendingClip", "clip_coefficient"]

# torch.nn.utils.clip_grad_norm_'s guard against a zero norm; kept identical so that the coefficient
# follows torch's formula bit for bit
CLIP_EPS = 1e-6


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + 1e-6)) in fp32 (torch's clip_grad_norm_ formula), for a finite norm."""
    return (max_norm / (norm.to(torch.float32) + CLIP_EPS)).clamp(max=1.0)


def _version(grad: torch.Tensor) -> tuple[int, int]:
    """Which gradient tensor, and how many in-place writes it has seen (``Tensor._version``: backward's
    accumulation, ``mul_``, ``zero_`` and ``copy_`` each bump it)."""
    return id(grad), grad._version


@dataclass(frozen=True, slots=True)
class PendingClip:
    """A clip measured by ``Fp8AdamW.clip_grad_norm_`` and not yet applied.

    coef:      the fp32 clip coefficient, in (0, 1]; the next step multiplies every gradient by it.
    grad_amax: {parameter: fl(max |grad| x coef)} (0-d fp32): the exact max |g| of the clipped gradient.
    versions:  {parameter: (id, _version) of its gradient} when measured: a gradient changed since makes
               both numbers stale, and the step refuses them (``check``)."""

    coef: float
    grad_amax: dict[torch.Tensor, torch.Tensor]
    versions: dict[torch.Tensor, tuple[int, int]]

    @classmethod
    def measured(cls, coef: torch.Tensor, grad_amax: dict[torch.Tensor, torch.Tensor]) -> PendingClip:
        scaled = {p: (amax * coef).reshape(()) for p, amax in grad_amax.items()}
        return cls(coef=float(coef), grad_amax=scaled, versions={p: _version(p.grad) for p in grad_amax})

    def check(self, owner: str, params: list[torch.Tensor]) -> None:
        """RuntimeError unless every parameter stepped has the gradient that was measured, unchanged."""
        stepped = {p for p in params if p.grad is not None and p.numel() > 0}
        changed = [p for p in stepped if p not in self.versions or _version(p.grad) != self.versions[p]]
        if changed or stepped != set(self.versions):
            raise RuntimeError(f"{owner}.step: {len(changed) or 'some'} gradient(s) changed (or appeared / went) "
                               "after clip_grad_norm_ measured them; call clip_grad_norm_ again right before step")
