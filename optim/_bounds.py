"""One-pass scales: upper bounds of the new amax of m, v and the weight, known before a step writes anything.

A fresh amax-based scale needs the new values before anything is stored; computing them twice (pass 1:
amax, pass 2: recompute and store) read every tensor twice. Instead each step records, per tensor, a
few numbers about what it stored (``RECORD``); with them and amax(g) (one read of the gradient) the
next step bounds the new amax of every state from above BEFORE its single pass, takes its scales from
the bounds (``amax_to_log2_scale``, as from an amax), and knows that nothing can overflow them. The
chosen alternative, "delayed" scales plus a redo of the rare tensor that overflows them, needs the old
state at redo time, i.e. a detection before any write, i.e. these bounds anyway.

Numerical decisions (u = 2**-24, fp32's unit roundoff; every bound is an upper bound, never an estimate):
  v: fl(fl(A_v * beta2) + fl(fl(A_g * A_g) * (1 - beta2))), in fp32 in the step's own order, with A_v the
     exact amax of the stored v: each rounding is monotone on non-negative terms, so this is exactly
     the largest value any element can reach; the new amax is at least half of it (v >= beta2 * v_old
     and v >= (1 - beta2) g**2), so the scale is at most one binade coarser than the fresh one.
  m: exact (fl(A_g * c1)) while m is all zero (first step); otherwise
     (1 + 5u) ((1 - c1 + 3u) A_m + c1 A_g): m + (g - m) c1 with three roundings. The margin pushes an
     amax sitting on a power of two one binade coarser; cancellation between m and g makes it looser.
  weight: |w1| <= (1 + u)**2 (A_w |decay| + step_size U), U bounding |m_new / denom|. |m| / eps alone
     would be useless (A_m / eps ~ 1e5 A_w), so the store pass records, over the elements whose sqrt(v)
     is well above v's rounding floor ("big": sqrt(v_new) >= tau), max |m_new / denom| and min denom,
     and over the others max |m_new| (their next denominator is only known to exceed eps). With
     |m_stored| <= |m_new| (1 + rho_m) + q_m and v_stored >= v_new (1 - rho_v) - q_v (rho: one ulp,
     which also covers stochastic rounding; q: one subnormal step at the new scale), the next step
     bounds Q = max |m| / (bc sqrt(beta2 v) + eps), and U <= (1 + 6u) (c1' Q + c1 / (bc sqrt(c2)))
     since (a + b) / sqrt(x + y) <= a / sqrt(x) + b / sqrt(y). In practice the bound exceeds
     step_size * max|update| by ~2-3x, i.e. a few lr above A_w: the master's scale rarely moves.
The bounds are computed in float64 with a relative margin of 2**-40 (covering float64's own
rounding), an absolute one of 2**-140 (fp32 subnormal roundings), and rounded up to fp32. They are
pure functions of per-tensor scalars, computed by this module for the C kernel and the foreach path
alike, so both store the same bits. A bucket whose bounds are not finite (no record yet, e.g. a
state saved before records existed; a huge gradient; beta2 = 0) takes the two-pass step, which is
exact and records for the next one.
"""

from __future__ import annotations

import torch

from fp8train.optim._formats import StateFormat

__all__ = ["RECORD", "REC_W", "STATS", "bounds_", "initial_record", "next_record", "tau"]

# per-parameter record (state["bound_record"], (len(RECORD),) fp32)
RECORD = ("exp_avg_amax", "exp_avg_sq_amax", "weight_amax", "ratio_big", "ratio_k", "exp_avg_small", "eps")
REC_M, REC_V, REC_W, REC_P_BIG, REC_K, REC_P_SMALL, REC_EPS = range(len(RECORD))
# store pass statistics per tensor, as fp32 values: the largest stored value of m, v and the master in the
# scaled (stored) domain, max |m_new / denom| and min denom over the big elements, max |m_new| over the others
STATS = ("exp_avg_stored", "exp_avg_sq_stored", "master_stored", "update_big", "denom_big", "exp_avg_small")

_U = 2.0**-24
_REL = 1.0 + 2.0**-40
_ABS = 2.0**-140
_F64 = torch.float64
# (mantissa bits, smallest subnormal) of each stored dtype; fp32 states are stored exactly (unscaled)
_GRID = {"e4m3": (3, 2.0**-9), "fp16": (10, 2.0**-24), "bf16": (7, 2.0**-133), "fp32": (None, 0.0)}


def _up32(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the smallest fp32 >= x (NaN stays NaN, becoming a non-finite bound)."""
    y = x.to(torch.float32)
    return torch.where(y.to(_F64) < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _down32(x: torch.Tensor) -> torch.Tensor:
    y = x.to(torch.float32)
    return torch.where(y.to(_F64) > x, torch.nextafter(y, torch.full_like(y, float("-inf"))), y)


def _grid(name: str, log2_scale: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(rho, q): one ulp relative, and one subnormal step in decoded units, of a slot at ``log2_scale``."""
    bits, q = _GRID[name]
    rho = 0.0 if bits is None else 2.0**-bits
    return rho, q * torch.exp2(-log2_scale.to(_F64))


def tau(v_fmt: StateFormat, log2_scale_v: torch.Tensor) -> torch.Tensor:
    """(n,) fp32 threshold on sqrt(v_new) of the big elements: 2 sigma / alpha, sigma = sqrt of v's
    rounding floor, alpha = sqrt(1 - rho_v) / (1 + u), so that big elements keep
    sqrt(v_stored) >= sqrt(v_new) alpha - sigma >= sqrt(v_new) alpha / 2."""
    rho_v, q_v = _grid(v_fmt.name, log2_scale_v)
    sigma = torch.sqrt(q_v + 2.0**-149) * _REL
    alpha = (1.0 - rho_v) ** 0.5 / (1.0 + _U)
    return _up32(2.0 * sigma / alpha * _REL)


def initial_record(weight_amax: torch.Tensor) -> torch.Tensor:
    """The record of a fresh state: m = v = 0 (exactly), the weight's exact amax, no ratios yet (with
    ratio_big = exp_avg_small = 0 the first step's U is the gradient term alone, exact for m = 0)."""
    rec = torch.zeros(len(RECORD), dtype=torch.float32, device=weight_amax.device)
    rec[REC_W] = weight_amax
    return rec


def bounds_(record: torch.Tensor, grad_amax: torch.Tensor, coef: torch.Tensor, cols: dict[str, int],
            weight_needed: bool) -> torch.Tensor:
    """(n, 3) fp32 upper bounds of the new amax of m, v and the weight (``weight_needed`` False: 0);
    non-finite where the step cannot be bounded (the caller then takes two passes)."""
    c = {name: coef[:, j] for name, j in cols.items()}
    a_g, a_m, a_v = grad_amax.to(torch.float32), record[:, REC_M], record[:, REC_V]
    # v: the step's own fp32 operations on the amaxes (exact, see the module docstring)
    v = a_v * c["beta2"] + (a_g * a_g) * c["one_minus_beta2"]
    # m: exact while m is all zero, else the margin for three roundings
    c1 = c["one_minus_beta1"].to(_F64)
    c1_m = 1.0 - c1 + 3 * _U
    m_general = _up32(((1 + 5 * _U) * (c1_m * a_m.to(_F64) + c1 * a_g.to(_F64))) * _REL + _ABS)
    m = torch.where(a_m == 0, a_g * c["one_minus_beta1"], m_general)
    if not weight_needed:
        return torch.stack([m, v, torch.zeros_like(v)], dim=1)
    rec = record.to(_F64)
    bc, b2, c2 = c["bc2_sqrt_inv"].to(_F64), c["beta2"].to(_F64), c["one_minus_beta2"].to(_F64)
    eps = c["eps"].to(_F64)
    beta = bc * b2.sqrt() * (1 - 2.0**-40)  # <= bc sqrt(beta2): the next denominator's factor on sqrt(v)
    lam = torch.minimum(beta * rec[:, REC_K], torch.clamp(eps / rec[:, REC_EPS], max=1.0) / (1 + _U))
    lam = lam * (1 - 2.0**-40)
    q_ratio = torch.maximum(torch.where(rec[:, REC_P_BIG] > 0, rec[:, REC_P_BIG] / lam, torch.zeros_like(lam)),
                            rec[:, REC_P_SMALL] / eps)
    f_den = 1 - 8 * _U - bc * 2.0**-72 / eps  # the new denominator's roundings, subnormal v included
    g_term = c1 / (bc * c2.sqrt()) * _REL  # c1 |g| / (bc sqrt(c2) |g| + eps)
    ratio = (1 + _U) * (1 + 5 * _U) / f_den * (c1_m * q_ratio + g_term) + _ABS / eps + _ABS
    ratio = torch.where(f_den > 0.5, ratio, torch.full_like(ratio, float("inf")))
    w = (1 + _U) ** 2 * (rec[:, REC_W] * c["decay"].to(_F64).abs() + c["step_size"].to(_F64) * ratio) * _REL + _ABS
    return torch.stack([m, v, _up32(w)], dim=1)


def next_record(stats: torch.Tensor, new_log2_scale: torch.Tensor, coef: torch.Tensor, cols: dict[str, int],
                formats: tuple[StateFormat, StateFormat, StateFormat | None]) -> torch.Tensor:
    """(n, len(RECORD)) fp32 records of the states just stored, from the store pass's (n, len(STATS))
    statistics and the scales it stored with (``new_log2_scale``, (n, 3))."""
    m_fmt, v_fmt, w_fmt = formats
    scale_inv = torch.exp2(-new_log2_scale)  # the decoder's own multiplier: these are exact decoded maxima
    st = stats.to(torch.float32)
    a_w = st[:, 2] * scale_inv[:, 2] if w_fmt is not None else torch.zeros_like(st[:, 2])
    rho_m, q_m = _grid(m_fmt.name, new_log2_scale[:, 0])
    rho_v, _ = _grid(v_fmt.name, new_log2_scale[:, 1])
    u_big, d_big, m_small = (st[:, j].to(_F64) for j in (3, 4, 5))
    q_m = q_m + 2.0**-149
    p_big = ((1 + rho_m) * (u_big * (1 + 2.0**-23) + 2.0**-149) + q_m / d_big) * _REL
    p_big = torch.where(torch.isfinite(d_big), p_big, torch.zeros_like(p_big))  # d_big inf: no big element
    p_small = torch.where(m_small > 0, ((1 + rho_m) * m_small + q_m) * _REL, torch.zeros_like(m_small))
    alpha = (1.0 - rho_v) ** 0.5 / (1.0 + _U)
    k = alpha / (2 * coef[:, cols["bc2_sqrt_inv"]].to(_F64) * (1 + _U) ** 2) * (1 - 2.0**-40)
    return torch.stack([st[:, 0] * scale_inv[:, 0], st[:, 1] * scale_inv[:, 1], a_w, _up32(p_big), _down32(k),
                        _up32(p_small), coef[:, cols["eps"]]], dim=1)

