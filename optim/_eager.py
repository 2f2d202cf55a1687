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

__all__ = ["COEF_NAMES", "SLOT_NAMES", "STORED_KEYS", "eager_amax", "eager_store", "eager_update",
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


def eager_update(grads: list[torch.Tensor], exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor],
                 weights: list[torch.Tensor], coef: torch.Tensor, scale_inv: torch.Tensor) -> _Lists:
    """New (m, v, w) in fp32 from gradients and stored states. ``weights`` are the stored masters
    (decoded with ``scale_inv[:, 2]``) or the parameters themselves (decoded with multiplier 1)."""
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
    denom = _sqrt_rn(v1)
    torch._foreach_mul_(denom, c["bc2_sqrt_inv"])
    torch._foreach_add_(denom, c["eps"])
    update = torch._foreach_div(m1, denom)
    torch._foreach_mul_(update, c["step_size"])
    w1 = torch._foreach_mul(w, c["decay"])
    torch._foreach_sub_(w1, update)
    return m1, v1, w1


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


def eager_store(new: _Lists, params: list[torch.Tensor], exp_avg: list[torch.Tensor],
                exp_avg_sq: list[torch.Tensor], master: list[torch.Tensor] | None,
                formats: tuple[StateFormat, StateFormat, StateFormat | None], new_scale: torch.Tensor) -> None:
    """Store the new states with the new scales (``new_scale``, powers of two); the parameter gets the
    value the master now holds, decoded back (or the new weight itself when it is its own master)."""
    m1, v1, w1 = new
    m_fmt, v_fmt, w_fmt = formats
    encode_(exp_avg, m1, _column(new_scale, 0), m_fmt)
    encode_(exp_avg_sq, v1, _column(new_scale, 1), v_fmt)
    if master is not None and w_fmt is not None:
        scale_w = _column(new_scale, 2)
        encode_(master, w1, scale_w, w_fmt)
        w1 = decode(master, torch._foreach_reciprocal(scale_w))  # 1 / 2**k: exact
    torch._foreach_copy_(params, w1)
