"""The step on any device with ``torch._foreach_*`` ops: the portable path and the reference of the
fused CPU kernel (same operations, same order, bit-identical results).

One step of a bucket, n tensors, in fp32:
    m1 = m + (g - m) * (1 - beta1)                        torch's lerp_, written out
    v1 = v * beta2 + (g * g) * (1 - beta2)
    w1 = w * (1 - lr * wd) - step_size * (m1 / (sqrt(v1) * bc2_sqrt_inv + eps))
with step_size = lr / (1 - beta1**t) and bc2_sqrt_inv = 1 / sqrt(1 - beta2**t) computed per tensor in
float64 and rounded once to fp32 (what torch does with its Python-float scalars). Multiplying by
bc2_sqrt_inv instead of dividing by sqrt(1 - beta2**t) saves a division per element and moves the
denominator by at most 1 ulp against torch.optim.AdamW.
"""

from __future__ import annotations

import torch

from fp8train.optim._formats import StateFormat, decode, encode_
from fp8train.optim._rounding import SR_SPECS, element_bits, stochastic_grid

__all__ = ["COEF_NAMES", "SLOT_NAMES", "STORED_KEYS", "eager_amax", "eager_step", "eager_store", "eager_update",
           "eager_update_and_amax"]

# columns of the per-tensor coefficient matrix; the C kernel's enum has the same order
COEF_NAMES = ("one_minus_beta1", "beta2", "one_minus_beta2", "decay", "step_size", "bc2_sqrt_inv", "eps", "grad_mul")
# columns of the per-tensor scale matrices (log2_scale, decode/encode multipliers, amax)
SLOT_NAMES = ("exp_avg", "exp_avg_sq", "master")
# Fp8AdamW's per-parameter state key of each slot's stored tensor (x * 2**log2_scale in the slot's
# format; the bias is under f"{slot}_log2_scale"). Deliberately not torch AdamW's "exp_avg" /
# "exp_avg_sq", which hold moments in the parameter's units: under the same names torch AdamW would
# load our scaled codes as moments (cast to fp32, no error); under these it fails at its first step.
STORED_KEYS = {slot: f"{slot}_scaled" for slot in SLOT_NAMES}

_PARAM_SR = {torch.bfloat16: "bf16", torch.float16: "fp16"}  # parameter dtypes that round stochastically
_Lists = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def _column(matrix: torch.Tensor, j: int) -> list[torch.Tensor]:
    """Column j of an (n, k) matrix as n 0-d tensors (per-tensor scalars for foreach ops)."""
    return list(matrix[:, j].unbind(0))


def _sqrt_rn(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Correctly rounded fp32 sqrt (as C's sqrtf and CUDA's sqrt). torch's CPU sqrt is a SLEEF
    approximation (<= 0.5001 ulp: about one result in five is 1 ulp off), so on the CPU it is taken
    in float64 and rounded once: double rounding is harmless for sqrt when 53 >= 2 * 24 + 2 bits."""
    if not xs or xs[0].device.type != "cpu":
        return torch._foreach_sqrt(xs)
    roots = torch._foreach_sqrt([x.to(torch.float64) for x in xs])
    return [r.to(torch.float32) for r in roots]


def _update(grads: list[torch.Tensor], exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor],
            weights: list[torch.Tensor], coef: torch.Tensor, scale_inv: torch.Tensor) -> tuple[_Lists, _Lists]:
    """(m1, v1, w1) and the intermediates the store pass's statistics need: (sqrt(v1), denom, m1 / denom)."""
    c = {name: _column(coef, j) for j, name in enumerate(COEF_NAMES)}
    g = decode(grads, c["grad_mul"])  # grad_mul is -1 for maximize: exact
    m = decode(exp_avg, _column(scale_inv, 0))
    v = decode(exp_avg_sq, _column(scale_inv, 1))
    w = decode(weights, _column(scale_inv, 2))
    m1 = torch._foreach_sub(g, m)
    torch._foreach_mul_(m1, c["one_minus_beta1"])
    m1 = torch._foreach_add(m, m1)
    gg = torch._foreach_mul(g, g)
    torch._foreach_mul_(gg, c["one_minus_beta2"])
    v1 = torch._foreach_mul(v, c["beta2"])
    torch._foreach_add_(v1, gg)
    root = _sqrt_rn(v1)
    denom = torch._foreach_mul(root, c["bc2_sqrt_inv"])
    torch._foreach_add_(denom, c["eps"])
    update = torch._foreach_div(m1, denom)
    w1 = torch._foreach_mul(w, c["decay"])
    torch._foreach_sub_(w1, torch._foreach_mul(update, c["step_size"]))
    return (m1, v1, w1), (root, denom, update)


def eager_update(grads: list[torch.Tensor], exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor],
                 weights: list[torch.Tensor], coef: torch.Tensor, scale_inv: torch.Tensor) -> _Lists:
    """New (m, v, w) in fp32 from gradients and stored states. ``weights`` are the stored masters
    (decoded with ``scale_inv[:, 2]``) or the parameters themselves (decoded with multiplier 1)."""
    return _update(grads, exp_avg, exp_avg_sq, weights, coef, scale_inv)[0]


def eager_amax(new: _Lists) -> torch.Tensor:
    """(n, 3) fp32 amax of the new m, v, w; NaN/inf stay visible (``_foreach_norm`` propagates them)."""
    cols = [torch.stack(torch._foreach_norm(xs, ord=float("inf"))) for xs in new]  # no empty tensors here
    return torch.stack(cols, dim=1).to(torch.float32)


def eager_update_and_amax(grads: list[torch.Tensor], exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor],
                          weights: list[torch.Tensor], coef: torch.Tensor,
                          scale_inv: torch.Tensor) -> tuple[_Lists, torch.Tensor]:
    """Pass 1 of a bucket: ``eager_update`` and ``eager_amax`` of its result (one traced graph when compiled)."""
    new = eager_update(grads, exp_avg, exp_avg_sq, weights, coef, scale_inv)
    return new, eager_amax(new)


def _random_fields(keys: torch.Tensor, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
    """Per tensor: m's 32 random bits, v's 16 (low half of stream 1), the weight's 16 (high half)."""
    r0 = [element_bits(keys[i, 0], t.numel()) for i, t in enumerate(tensors)]
    r1 = [element_bits(keys[i, 1], t.numel()) for i, t in enumerate(tensors)]
    return r0, [r & 0xFFFF for r in r1], [r >> 16 for r in r1]


def eager_store(new: _Lists, params: list[torch.Tensor], exp_avg: list[torch.Tensor],
                exp_avg_sq: list[torch.Tensor], master: list[torch.Tensor] | None,
                formats: tuple[StateFormat, StateFormat, StateFormat | None], new_scale: torch.Tensor,
                keys: torch.Tensor | None = None) -> None:
    """Store the new states with the new scales (``new_scale``, powers of two); the parameter gets the
    value the master now holds, decoded back (or the new weight itself when it is its own master).
    ``keys``: (n, 2) int64 stream keys for stochastic rounding (``_rounding``); None: round to nearest."""
    m1, v1, w1 = new
    m_fmt, v_fmt, w_fmt = formats
    r_m = r_v = r_w = None
    if keys is not None:
        r_m, r_v, r_w = _random_fields(keys, m1)
    encode_(exp_avg, m1, _column(new_scale, 0), m_fmt, r_m, 32)
    encode_(exp_avg_sq, v1, _column(new_scale, 1), v_fmt, r_v, 16)
    if master is not None and w_fmt is not None:
        scale_w = _column(new_scale, 2)
        encode_(master, w1, scale_w, w_fmt, r_w, 16)
        w1 = decode(master, torch._foreach_reciprocal(scale_w))  # 1 / 2**k: exact
    elif r_w is not None and params and params[0].dtype in _PARAM_SR:  # the parameter is its own master
        spec = SR_SPECS[_PARAM_SR[params[0].dtype]]
        w1 = [stochastic_grid(w, r, spec, 16) for w, r in zip(w1, r_w)]
    torch._foreach_copy_(params, w1)


def _stored_amax(stored: list[torch.Tensor]) -> torch.Tensor:
    """(n,) fp32 largest stored magnitude of each tensor, in the stored (scaled) domain."""
    return torch.stack([t.to(torch.float32).abs().amax() for t in stored])


def eager_step(grads: list[torch.Tensor], exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor],
               weights: list[torch.Tensor], coef: torch.Tensor, scale_inv: torch.Tensor, params: list[torch.Tensor],
               master: list[torch.Tensor] | None, formats: tuple[StateFormat, StateFormat, StateFormat | None],
               new_scale: torch.Tensor, keys: torch.Tensor | None, tau: torch.Tensor) -> torch.Tensor:
    """The store pass of a bucket (one traced graph when compiled): the update, stored with
    ``new_scale``, and its (n, 6) fp32 statistics (``_bounds.STATS``; tau: (n,) thresholds on sqrt(v1)).
    Every gradient is read (decoded to an fp32 copy) before any parameter is written."""
    new, (root, denom, update) = _update(grads, exp_avg, exp_avg_sq, weights, coef, scale_inv)
    ratio = []
    for m1, r, d, u, t in zip(new[0], root, denom, update, tau.unbind(0)):
        big = r >= t
        ratio.append(torch.stack([torch.where(big, u.abs(), 0.0).amax(),
                                  torch.where(big, d, float("inf")).amin(),
                                  torch.where(big, 0.0, m1.abs()).amax()]))
    eager_store(new, params, exp_avg, exp_avg_sq, master, formats, new_scale, keys)
    stored_w = _stored_amax(master) if master is not None else torch.zeros_like(tau)
    return torch.cat([torch.stack([_stored_amax(exp_avg), _stored_amax(exp_avg_sq), stored_w], dim=1),
                      torch.stack(ratio)], dim=1).to(torch.float32)
