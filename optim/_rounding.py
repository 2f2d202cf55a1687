"""Stochastic rounding of the optimizer state: the counter-based random bits and the rounding rule,
in torch ops (the reference of ``csrc/fp8adamw.c``, which computes the same bits in uint32 C).

Why: round-to-nearest drops every EMA increment below half an ulp (~3-6 % of |m| in E4M3, ~0.02 % of
v in FP16 against 1 - beta2 = 0.1 %), and an FP16 master drops every update below half its ulp, so a
steady gradient ends with m_hat and v_hat 20-30 % short of AdamW's. Stochastic rounding rounds up
with probability (distance to the lower grid point) / (grid spacing): E[sr(x)] = x, nothing is lost
on average.

Random bits (no torch RNG, no global state): a 32-bit integer hash, ``lowbias32`` (C. Wellons'
two-multiply finaliser), of a Weyl sequence, so each element's bits are a pure function of
(seed, parameter, step, element index):
    rounding_key = mix(mix(seed) ^ position)            per parameter, at state init (saved in the state);
                                                        position: the CRC-32 of the parameter's name when
                                                        the param groups carry ``param_names``, else its index
    stream_key_j = mix(rounding_key ^ mix(2 * step + j)) per parameter and step; j = 0: m, j = 1: v and w
    r_j[i]       = mix((stream_key_j + i * GOLDEN) mod 2**32)   element i of the flattened tensor
m takes r_0's 32 bits; v the low 16 bits of r_1, the weight (master, or the parameter when it is its
own master) the high 16. Indices are taken mod 2**32 (a tensor over 4 Gi elements reuses bits).

Rounding rule (``stochastic_grid``), on the fp32 value y already multiplied by the state's scale,
with p the format's mantissa bits, d = 23 - p the fp32 bits below its rounding position, q its
smallest subnormal and R the slot's random bits:
  - |y| is first clamped to the format's max (E4M3 448, FP16 65504, bf16 max): the scales keep
    |y| <= max, so this only guards the unscaled FP16 / bf16 parameter that is its own master;
  - normal range of the format: add R mod 2**d to the bit pattern of |y| and clear the low d bits.
    A carry into the exponent rounds up into the next binade, as it should. Exactly unbiased: the
    fp32 value has no bits below those d;
  - subnormal range (|y| below the format's smallest normal; not bf16, whose subnormals are fp32's
    and handled by the rule above): code = floor(trunc(|y| / q * 2**k) + (R mod 2**k)) / 2**k),
    value code * q, with k = 28 (E4M3 m), 21 (FP16 m) or 16 (FP16 v / w). trunc drops the bits of
    |y| / q below 2**-k: a bias towards zero below 2**-k of a subnormal step;
  - the sign is put back (a negative value that rounds to 0 gives -0.0, as the nearest encoder does).
The result is exactly representable in the format, so the ordinary (round-to-nearest) encoder then
stores it unchanged. fp32 states need no rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GOLDEN", "SrSpec", "lowbias32", "parameter_key", "element_bits", "stochastic_grid", "stream_keys"]

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # 2**32 / golden ratio, odd: i * GOLDEN mod 2**32 is a bijection of the indices


@dataclass(frozen=True, slots=True)
class SrSpec:
    """The rule's constants for one storage format (see the module docstring).
    mantissa_bits: p; clamp_bits: fp32 bits of the format's max; min_normal_bits: fp32 bits of its
    smallest normal (0: no subnormal branch); log2_q: -log2 of its smallest subnormal."""

    mantissa_bits: int
    clamp_bits: int
    min_normal_bits: int
    log2_q: int

    def sub_bits(self, random_bits: int) -> int:
        """k: random bits used in the subnormal branch (|y| / q * 2**k must stay below 2**31)."""
        headroom = 31 - (self.log2_q - (127 - (self.min_normal_bits >> 23)))  # |y| / q < 2**(that)
        return min(random_bits, headroom)


SR_SPECS = {
    "e4m3": SrSpec(mantissa_bits=3, clamp_bits=0x43E00000, min_normal_bits=0x3C800000, log2_q=9),
    "fp16": SrSpec(mantissa_bits=10, clamp_bits=0x477FE000, min_normal_bits=0x38800000, log2_q=24),
    "bf16": SrSpec(mantissa_bits=7, clamp_bits=0x7F7F0000, min_normal_bits=0, log2_q=133),
}


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for int64 x in [0, 2**32): in two 16-bit halves of c, so no product
    exceeds 2**49 (int64 never overflows, under torch.compile too)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit integer hash (int64 tensors holding uint32 values)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def parameter_key(seed: int, position: int) -> torch.Tensor:
    """0-d int64 rounding key of the parameter at ``position`` (its name's CRC-32, or its index over
    all param groups; ``Fp8AdamW._positions``)."""
    return lowbias32(lowbias32(torch.tensor(seed & M32, dtype=torch.int64)) ^ (position & M32))


def stream_keys(rounding_key: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """(n, 2) int64 stream keys of this step: rounding keys (n,) int64, step numbers being taken (n,)."""
    t = step.to(torch.int64) * 2
    return torch.stack([lowbias32(rounding_key ^ lowbias32((t + j) & M32)) for j in (0, 1)], dim=1)


def element_bits(key: torch.Tensor, numel: int) -> torch.Tensor:
    """(numel,) int64 random uint32 of one stream (``key`` a 0-d int64) for elements 0 .. numel - 1."""
    idx = torch.arange(numel, dtype=torch.int64, device=key.device) & M32
    return lowbias32((key + _mul32(idx, GOLDEN)) & M32)


def stochastic_grid(y: torch.Tensor, random: torch.Tensor, spec: SrSpec, random_bits: int) -> torch.Tensor:
    """fp32 ``y`` (scaled) rounded stochastically onto the format's grid (the rule above), same shape;
    ``random`` holds ``random_bits`` uniform bits per element (int64, flattened order)."""
    bits = y.reshape(-1).view(torch.int32).to(torch.int64) & M32
    ab = torch.clamp(bits & 0x7FFFFFFF, max=spec.clamp_bits)
    d_mask = (1 << (23 - spec.mantissa_bits)) - 1
    out = (ab + (random & d_mask)) & (M32 ^ d_mask)
    if spec.min_normal_bits:
        k = spec.sub_bits(random_bits)
        scaled = ab.to(torch.int32).view(torch.float32) * 2.0 ** (spec.log2_q + k)
        code = (scaled.to(torch.int64) + (random & ((1 << k) - 1))) >> k
        sub = (code.to(torch.float32) * 2.0 ** -spec.log2_q).view(torch.int32).to(torch.int64)
        out = torch.where(ab < spec.min_normal_bits, sub, out)
    magnitude = out.to(torch.int32).view(torch.float32)
    return torch.where(bits >= 0x80000000, -magnitude, magnitude).reshape(y.shape)
