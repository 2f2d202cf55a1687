"""``Fp8AdamWConfig``: the optimizer's settings as a typed config, and the one home of their rules.

``check_hyperparameters`` and ``state_format_names`` are the only validation of AdamW's settings in
the project: ``Fp8AdamW`` (constructor, param groups, loaded state), ``Fp8AdamWConfig`` and the
trainer's ``OptimConfig`` / ``OptimStateConfig`` (which hold the same fields under their own YAML
keys) all call them, so a value is accepted or refused by the same rule wherever it is written."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fp8train._validate import check_type
from fp8train.optim._formats import EXP_AVG_FORMATS, EXP_AVG_SQ_FORMATS, MASTER_FORMATS, resolve_format

__all__ = ["ROUNDING_MODES", "Fp8AdamWConfig", "check_hyperparameters", "check_lr", "check_rounding",
           "state_format_names"]

ROUNDING_MODES = ("nearest", "stochastic")

# The rules, stated once:
#   lr, weight_decay: finite >= 0. An infinite lr makes the first update inf * 0 = nan or inf, and
#       lr * weight_decay = inf turns w * (1 - lr * wd) into -inf: never a usable setting.
#   eps: finite > 0. With eps 0 an element whose gradient has always been 0 (an unused embedding
#       row) has m = v = 0 and its update m_hat / sqrt(v_hat) = 0 / 0 = nan: Fp8AdamW would skip
#       every step (overflow), torch's AdamW would write nan into the weight.
#   beta1, beta2: [0, 1). beta 1 keeps the moment at its initial 0 forever and makes the bias
#       correction 1 - beta**t zero (a division by zero).


def _check_finite(owner: str, field: str, value: Any, *, positive: bool) -> None:
    check_type(owner, field, value, (int, float))
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{owner}.{field}={value!r} is out of range; allowed: finite numbers "
                         f"{'> 0' if positive else '>= 0'}")


def check_lr(owner: str, field: str, value: Any) -> None:
    """A learning rate (``lr``, or a schedule's ``min_lr``): a finite number >= 0."""
    _check_finite(owner, field, float(value) if isinstance(value, torch.Tensor) else value, positive=False)


def check_hyperparameters(owner: str, *, lr: Any, betas: Any, eps: Any, weight_decay: Any, maximize: Any = False,
                          beta_fields: tuple[str, str] = ("betas[0]", "betas[1]")) -> None:
    """The AdamW hyper-parameters of a config, of the constructor or of one param group; ``beta_fields``
    names the betas as the caller's fields are named (a config's ``beta1``, ``beta2``)."""
    check_lr(owner, "lr", lr)
    if not isinstance(betas, Iterable) or len(tuple(betas)) != 2:
        raise ValueError(f"{owner}.betas={betas!r} must be a pair (beta1, beta2)")
    for name, beta in zip(beta_fields, betas):
        check_type(owner, name, beta, (int, float))
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{owner}.{name}={beta!r} is out of range; allowed: numbers in [0, 1)")
    _check_finite(owner, "eps", eps, positive=True)
    _check_finite(owner, "weight_decay", weight_decay, positive=False)
    check_type(owner, "maximize", maximize, bool)


def check_rounding(owner: str, *, rounding: Any, seed: Any) -> None:
    """The state's rounding mode and the seed of its random bits (an int in [0, 2**32))."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"{owner}.rounding={rounding!r} is not allowed; allowed values: "
                         f"{', '.join(repr(m) for m in ROUNDING_MODES)}")
    check_type(owner, "seed", seed, int)
    if isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"{owner}.seed={seed!r} is out of range; allowed: integers in [0, 2**32)")


def state_format_names(owner: str, *, exp_avg_dtype: Any, exp_avg_sq_dtype: Any,
                       master_dtype: Any) -> dict[str, str | None]:
    """The config names of the three state formats (a torch dtype is accepted and named, as YAML and
    wandb see names); ValueError naming the field and the allowed values otherwise."""
    out: dict[str, str | None] = {}
    for field, value, allowed in (("exp_avg_dtype", exp_avg_dtype, EXP_AVG_FORMATS),
                                  ("exp_avg_sq_dtype", exp_avg_sq_dtype, EXP_AVG_SQ_FORMATS),
                                  ("master_dtype", master_dtype, MASTER_FORMATS)):
        fmt = resolve_format(owner, field, value, allowed)
        out[field] = None if fmt is None else fmt.name
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class Fp8AdamWConfig:
    """Settings of ``Fp8AdamW`` (see its docstring for the numerics).

    lr:               learning rate (finite, >= 0), per step.
    beta1, beta2:     decay rates of the first and second moment, in [0, 1).
    eps:              added to sqrt(v_hat) in the denominator (finite, > 0).
    weight_decay:     decoupled weight decay coefficient (finite, >= 0): w <- w * (1 - lr * weight_decay).
    (The rules and their reasons: the comment above ``check_hyperparameters``.)
    exp_avg_dtype:    storage of m: "e4m3" (1 byte) | "bf16" | "fp16" | "fp32" (a torch dtype is
                      accepted and stored as its name, as for the two below).
    exp_avg_sq_dtype: storage of v: "fp16" (2 bytes) | "bf16" | "fp32".
    master_dtype:     storage of the master weight: "fp16" (2 bytes, scaled) | "bf16" | "fp32" |
                      None (no master: the parameter itself, in its own dtype, is updated).
    maximize:         ascend instead of descend (the gradient's sign is flipped, exactly).
    fused:            True: the fused C kernel for CPU tensors (error if it cannot be built);
                      False: the foreach path everywhere; None: the kernel where possible.
    compiled:         the foreach path compiled (torch.compile): None = on accelerators only.
    rounding:         re-encoding of the states: "nearest" (round to nearest even) | "stochastic"
                      (unbiased; see ``Fp8AdamW``).
    seed:             seed of the stochastic rounding's random bits, an int in [0, 2**32).
    """

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    exp_avg_dtype: str = "e4m3"
    exp_avg_sq_dtype: str = "fp16"
    master_dtype: str | None = "fp16"
    maximize: bool = False
    fused: bool | None = None
    compiled: bool | None = None
    rounding: str = "nearest"
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "Fp8AdamWConfig"
        check_hyperparameters(owner, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                              weight_decay=self.weight_decay, maximize=self.maximize, beta_fields=("beta1", "beta2"))
        names = state_format_names(owner, exp_avg_dtype=self.exp_avg_dtype, exp_avg_sq_dtype=self.exp_avg_sq_dtype,
                                   master_dtype=self.master_dtype)
        for field, name in names.items():
            object.__setattr__(self, field, name)  # frozen: a dtype becomes its name once, at construction
        check_rounding(owner, rounding=self.rounding, seed=self.seed)
        for field in ("fused", "compiled"):
            if getattr(self, field) is not None:
                check_type(owner, field, getattr(self, field), bool)

    def build(self, params: Any, *, fp8_weights: Any = None):
        """The optimizer for ``params`` (an iterable of tensors or of param-group dicts);
        ``fp8_weights``: Fp8AdamW's {parameter: layer} of FP8 primary weights."""
        from fp8train.optim.adamw import Fp8AdamW

        return Fp8AdamW(params, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                        weight_decay=self.weight_decay, exp_avg_dtype=self.exp_avg_dtype,
                        exp_avg_sq_dtype=self.exp_avg_sq_dtype, master_dtype=self.master_dtype,
                        maximize=self.maximize, fused=self.fused, compiled=self.compiled,
                        fp8_weights=fp8_weights, rounding=self.rounding, seed=self.seed)
