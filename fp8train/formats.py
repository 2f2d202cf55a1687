"""FP8 formats: the two OCP FP8 encodings fp8train uses, as typed constants.

E4M3 (``torch.float8_e4m3fn``) carries weights, activations, weight gradients and Adam's first
moment: 3 mantissa bits, range up to 448, no infinities (``fn`` = finite, NaN only).
E5M2 (``torch.float8_e5m2``) carries output gradients: 2 mantissa bits, range up to 57344, IEEE-like
with infinities. The numbers below are derived from the bit layouts and cross-checked against
``torch.finfo`` in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Fp8Format", "E4M3", "E5M2", "FP8_FORMATS", "format_by_name"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Fp8Format:
    """One FP8 encoding.

    name:            short name used in configs ("e4m3" | "e5m2").
    dtype:           the torch float8 dtype that carries the data.
    max:             largest finite magnitude.
    min_normal:      smallest positive normal, 2**(1 - exponent_bias).
    min_subnormal:   smallest positive subnormal, min_normal * 2**-mantissa_bits.
    mantissa_bits:   explicit mantissa bits (3 for E4M3, 2 for E5M2).
    exponent_bias:   IEEE-style exponent bias (7 for E4M3, 15 for E5M2).
    """

    name: str
    dtype: torch.dtype
    max: float
    min_normal: float
    min_subnormal: float
    mantissa_bits: int
    exponent_bias: int

    @property
    def log2_max(self) -> float:
        """log2 of ``max``; not an integer (448 = 1.75 * 2**8)."""
        return math.log2(self.max)


E4M3 = Fp8Format(
    name="e4m3",
    dtype=torch.float8_e4m3fn,
    max=448.0,
    min_normal=2.0**-6,
    min_subnormal=2.0**-9,
    mantissa_bits=3,
    exponent_bias=7,
)
E5M2 = Fp8Format(
    name="e5m2",
    dtype=torch.float8_e5m2,
    max=57344.0,
    min_normal=2.0**-14,
    min_subnormal=2.0**-16,
    mantissa_bits=2,
    exponent_bias=15,
)

FP8_FORMATS: dict[str, Fp8Format] = {E4M3.name: E4M3, E5M2.name: E5M2}


def format_by_name(name: str) -> Fp8Format:
    """Look a format up by its config name; raises ValueError naming the allowed values."""
    try:
        return FP8_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown FP8 format {name!r}; allowed: {sorted(FP8_FORMATS)}") from None
