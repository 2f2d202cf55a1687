"""``Fp8AdamWConfig``: the optimizer's settings as a typed config (Hydra fills it from YAML), and the
validation shared with ``Fp8AdamW``'s constructor and its param groups."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fp8train._validate import check_type
from fp8train.optim._formats import EXP_AVG_FORMATS, EXP_AVG_SQ_FORMATS, MASTER_FORMATS, resolve_format

__all__ = ["Fp8AdamWConfig", "check_hyperparameters"]


def _check_range(owner: str, field: str, value: Any, lo: float, hi: float, *, hi_open: bool = False) -> None:
    check_type(owner, field, value, (int, float))
    if not (lo <= value < hi if hi_open else lo <= value <= hi):
        raise ValueError(f"{owner}.{field}={value!r} is out of range; allowed: numbers in "
                         f"[{lo}, {hi}{')' if hi_open else ']'}")


def check_hyperparameters(owner: str, *, lr: Any, betas: Any, eps: Any, weight_decay: Any, maximize: Any) -> None:
    """The AdamW hyper-parameters of the constructor or of one param group."""
    _check_range(owner, "lr", float(lr) if isinstance(lr, torch.Tensor) else lr, 0.0, float("inf"))
    if not isinstance(betas, Iterable) or len(tuple(betas)) != 2:
        raise ValueError(f"{owner}.betas={betas!r} must be a pair (beta1, beta2)")
    for name, beta in zip(("betas[0]", "betas[1]"), betas):
        _check_range(owner, name, beta, 0.0, 1.0, hi_open=True)
    _check_range(owner, "eps", eps, 0.0, float("inf"))
    _check_range(owner, "weight_decay", weight_decay, 0.0, float("inf"))
    check_type(owner, "maximize", maximize, bool)


@dataclass(kw_only=True, slots=True)
class Fp8AdamWConfig:
    """Settings of ``Fp8AdamW`` (see its docstring for the numerics).

    lr:               learning rate (>= 0), per step.
    beta1, beta2:     decay rates of the first and second moment, in [0, 1).
    eps:              added to sqrt(v_hat) in the denominator (>= 0).
    weight_decay:     decoupled weight decay coefficient (>= 0): w <- w * (1 - lr * weight_decay).
    exp_avg_dtype:    storage of m: "e4m3" (1 byte) | "bf16" | "fp16" | "fp32".
    exp_avg_sq_dtype: storage of v: "fp16" (2 bytes) | "bf16" | "fp32".
    master_dtype:     storage of the master weight: "fp16" (2 bytes, scaled) | "bf16" | "fp32" |
                      None (no master: the parameter itself, in its own dtype, is updated).
    maximize:         ascend instead of descend (the gradient's sign is flipped, exactly).
    fused:            True: the fused C kernel for CPU tensors (error if it cannot be built);
                      False: the foreach path everywhere; None: the kernel where possible.
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

    def __post_init__(self) -> None:
        owner = "Fp8AdamWConfig"
        check_hyperparameters(owner, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                              weight_decay=self.weight_decay, maximize=self.maximize)
        resolve_format(owner, "exp_avg_dtype", self.exp_avg_dtype, EXP_AVG_FORMATS)
        resolve_format(owner, "exp_avg_sq_dtype", self.exp_avg_sq_dtype, EXP_AVG_SQ_FORMATS)
        resolve_format(owner, "master_dtype", self.master_dtype, MASTER_FORMATS)
        if self.fused is not None:
            check_type(owner, "fused", self.fused, bool)

    def build(self, params: Any):
        """The optimizer for ``params`` (an iterable of tensors or of param-group dicts)."""
        from fp8train.optim.adamw import Fp8AdamW

        return Fp8AdamW(params, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                        weight_decay=self.weight_decay, exp_avg_dtype=self.exp_avg_dtype,
                        exp_avg_sq_dtype=self.exp_avg_sq_dtype, master_dtype=self.master_dtype,
                        maximize=self.maximize, fused=self.fused)
