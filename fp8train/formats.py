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

__all__ = ["Fp8Format", "E4M3", "E5M2", "FP8_FORMATS", "FP8_DTYPES", "as_fp8_format", "format_by_name"]


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
# torch's float8 dtypes that are one of our formats. The fnuz variants (no -0, other bias), e8m0
# (scales only) and anything else are different encodings, not other names for these.
FP8_DTYPES: dict[torch.dtype, Fp8Format] = {E4M3.dtype: E4M3, E5M2.dtype: E5M2}
_ALLOWED = "fp8train.E4M3 / torch.float8_e4m3fn / 'e4m3', fp8train.E5M2 / torch.float8_e5m2 / 'e5m2'"


def format_by_name(name: str) -> Fp8Format:
    """Look a format up by its config name; raises ValueError naming the allowed values."""
    try:
        return FP8_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown FP8 format {name!r}; allowed: {sorted(FP8_FORMATS)}") from None


def as_fp8_format(fmt: Fp8Format | torch.dtype | str) -> Fp8Format:
    """The ``Fp8Format`` that ``fmt`` names: a format record (returned as it is), torch's float8
    dtype of E4M3 or E5M2 (as torchao takes them), or a config name. TypeError naming the allowed
    values for anything else, including torch's other float8 dtypes (fnuz, e8m0)."""
    if isinstance(fmt, Fp8Format):
        return fmt
    if isinstance(fmt, torch.dtype):
        found = FP8_DTYPES.get(fmt)
    else:
        found = FP8_FORMATS.get(fmt) if isinstance(fmt, str) else None
    if found is None:
        raise TypeError(f"fmt={fmt!r} is not an FP8 format fp8train supports; allowed: {_ALLOWED}")
    return found
