"""Storage formats of the optimizer state: which dtypes may hold m, v and the master weight, how
each is scaled, and the eager (foreach) encode/decode between fp32 and the stored value.

Scaling per format (a power-of-two scale, ``stored = x * 2**log2_scale``):
  - e4m3 and fp16 have a narrow exponent range (e4m3: 2**-9 .. 448, fp16: 2**-24 .. 65504), so the
    scale maps the tensor's fresh amax just under the format's max (``amax_to_log2_scale``): the
    largest element keeps full precision and as few small ones as possible fall into subnormals.
  - bf16 and fp32 share fp32's exponent range: a power-of-two scale would not change a single rounding
    (it only shifts exponents), so they stay unscaled (log2_scale 0) and need no amax.
Encoding rounds to nearest even, or stochastically (``_rounding``); e4m3 is clamped to +-448 first
(``fp8train.cast`` semantics); fp16 cannot overflow because its scale keeps the values under 65504.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8train.formats import E4M3, Fp8Format
from fp8train.optim._rounding import SR_SPECS, stochastic_grid

__all__ = [
    "EXP_AVG_FORMATS",
    "EXP_AVG_SQ_FORMATS",
    "MASTER_FORMATS",
    "PARAM_DTYPES",
    "STATE_FORMATS",
    "StateFormat",
    "decode",
    "encode_",
    "resolve_format",
]

# fp16 described with the same record as the FP8 formats: the scaling pipeline reads only ``max``.
_FP16_RANGE = Fp8Format(name="fp16", dtype=torch.float16, max=65504.0, min_normal=2.0**-14,
                        min_subnormal=2.0**-24, mantissa_bits=10, exponent_bias=15)


@dataclass(frozen=True, kw_only=True, slots=True)
class StateFormat:
    """name:  config name ("e4m3" | "bf16" | "fp16" | "fp32").
    dtype:  torch dtype that stores the values.
    code:   the dtype's number in the CPU kernel (``csrc/fp8adamw.c``).
    range:  format whose ``max`` the scaled values are fitted under; None: unscaled.
    """

    name: str
    dtype: torch.dtype
    code: int
    range: Fp8Format | None

    @property
    def scaled(self) -> bool:
        return self.range is not None


STATE_FORMATS: dict[str, StateFormat] = {
    "fp32": StateFormat(name="fp32", dtype=torch.float32, code=0, range=None),
    "bf16": StateFormat(name="bf16", dtype=torch.bfloat16, code=1, range=None),
    "fp16": StateFormat(name="fp16", dtype=torch.float16, code=2, range=_FP16_RANGE),
    "e4m3": StateFormat(name="e4m3", dtype=torch.float8_e4m3fn, code=3, range=E4M3),
}
EXP_AVG_FORMATS = ("e4m3", "bf16", "fp16", "fp32")
EXP_AVG_SQ_FORMATS = ("bf16", "fp16", "fp32")  # v >= 0 spans a wide range: 3 mantissa bits are too few
MASTER_FORMATS = ("bf16", "fp16", "fp32", None)  # None: the parameter itself is the master
PARAM_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # parameter / gradient codes

_BY_DTYPE = {f.dtype: f for f in STATE_FORMATS.values()}


def resolve_format(owner: str, field: str, value: torch.dtype | str | None,
                   allowed: tuple[str | None, ...]) -> StateFormat | None:
    """A dtype or its config name -> StateFormat (None stays None where allowed); ValueError names the
    field and the allowed values otherwise."""
    fmt = _BY_DTYPE.get(value) if isinstance(value, torch.dtype) else STATE_FORMATS.get(value) if isinstance(value, str) else None
    name = None if fmt is None else fmt.name
    if (value is None and None in allowed) or (fmt is not None and name in allowed):
        return fmt
    shown = ", ".join("None" if a is None else f"{a!r} ({STATE_FORMATS[a].dtype})" for a in allowed)
    raise ValueError(f"{owner}.{field}={value!r} is not allowed; allowed values: {shown}")


def decode(stored: list[torch.Tensor], scale_inv: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 values ``stored * scale_inv`` (exact: a power of two, one rounding only below fp32's
    normal range). ``scale_inv`` holds 0-d fp32 tensors, one per tensor."""
    return torch._foreach_mul([s.to(torch.float32) for s in stored], scale_inv)


def encode_(stored: list[torch.Tensor], values_fp32: list[torch.Tensor], scale: list[torch.Tensor],
            fmt: StateFormat, random: list[torch.Tensor] | None = None, random_bits: int = 32) -> None:
    """stored <- round_to_nearest_even(clamp(values * scale)) in ``fmt``; the clamp (e4m3 only) is
    ``fp8train.cast.cast_to_fp8_reference``'s, applied to the whole list at once. With ``random``
    (per tensor, ``random_bits`` uniform bits per element, ``_rounding``) the scaled values are
    first rounded stochastically onto the format's grid, so the nearest rounding then keeps them."""
    scaled = torch._foreach_mul(values_fp32, scale)
    if random is not None and fmt.name in SR_SPECS:
        spec = SR_SPECS[fmt.name]
        scaled = [stochastic_grid(y, r, spec, random_bits) for y, r in zip(scaled, random)]
    if fmt.dtype == E4M3.dtype:
        torch._foreach_clamp_min_(scaled, -E4M3.max)
        torch._foreach_clamp_max_(scaled, E4M3.max)
    torch._foreach_copy_(stored, scaled)
