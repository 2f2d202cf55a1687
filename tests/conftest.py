"""Shared test helpers. Tolerance tiers (docs/design.md, Tests):
  1. bit-exact (``torch.equal`` on uint8 views / ``rtol=0, atol=0``): lossless paths;
  2. SQNR floors in dB: lossy FP8 paths, floor derived from the mantissa width next to each use;
  3. ``hp_tol(dtype)``: high-precision parity where only summation order differs.
"""

from __future__ import annotations

import pytest
import torch


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``ref``, in dB (computed in fp64)."""
    ref64, approx64 = ref.detach().double(), approx.detach().double()
    noise = (ref64 - approx64).pow(2).sum()
    return float(10 * torch.log10(ref64.pow(2).sum() / noise)) if noise > 0 else float("inf")


def hp_tol(dtype: torch.dtype) -> dict[str, float]:
    """rtol/atol for comparing two high-precision computations that differ only in summation order
    or in one final rounding to ``dtype``: a few ulps of the dtype."""
    return {
        torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.float16: dict(rtol=2e-3, atol=1e-4),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    }[dtype]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def markov_train_losses(model: torch.nn.Module, steps: int, *, lr: float = 3e-3) -> list[float]:
    """Per-step losses of ``model`` (vocab 64, block 32) trained with AdamW on synthetic Markov
    tokens; the same data and batch order for every call, so two models compare step by step."""
    from synthetic import MarkovTokens

    data = MarkovTokens(64, 32, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = data.batch(16, gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
