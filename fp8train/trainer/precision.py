"""``PrecisionConfig``: where a training run uses FP8 (or bf16), as one typed record.

The presets (``configs/precision/*.yaml``), each adding to the one before:
  fp32    everything in fp32; gradients all-reduced in fp32; torch AdamW.
  bf16    GEMM operands rounded to bf16 (on CPU: an exact emulation, fp32 accumulation; on CUDA:
          torch.autocast), the rest fp32; the high-precision baseline.
  fp8_o1  FP8 GEMMs (E4M3 forward, E5M2 output gradients) + FP8 gradient all-reduce with a
          globally-synced per-tensor scale (fp8train.comm).
  fp8_o2  + Fp8AdamW: E4M3 first moment, FP16 second moment, FP16 scaled master weights.
  fp8_o3  + whole-tensor ZeRO-2 and FP8 primary weights (E4M3 + scale, 1 byte per element; the
          master lives only in Fp8AdamW on the owner, which all-gathers the codes), and stochastic
          rounding of Fp8AdamW's state (unbiased; bench/accuracy.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from fp8train.comm.config import Fp8CommConfig
from fp8train.config import Fp8Config
from fp8train.convert import FP8_DIM_MULTIPLE, conversion_targets, convert_to_fp8
from fp8train.errors import ConfigError
from fp8train.linear import Fp8Linear
from fp8train.optim.config import check_rounding, state_format_names
from fp8train.te import convert_to_te, te_forward_context, te_recipe_kwargs
from fp8train.trainer.bf16 import bf16_autocast, convert_to_bf16_emulated

__all__ = ["OptimStateConfig", "PrecisionConfig", "apply_precision"]


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimStateConfig:
    """Storage formats of Fp8AdamW's state (used when ``PrecisionConfig.optimizer="fp8_adamw"``):
    exp_avg_dtype "e4m3" | "bf16" | "fp16" | "fp32"; exp_avg_sq_dtype "fp16" | "bf16" | "fp32";
    master_dtype "fp16" | "bf16" | "fp32" | None (the parameter itself is the master). The allowed
    names are fp8train.optim's (``EXP_AVG_FORMATS`` ...), checked by its ``state_format_names``.
    rounding: how the states are re-encoded each step: "nearest" (round to nearest even) |
    "stochastic" (unbiased; its random bits come from the run's ``seed``, the step and the parameter,
    so runs and resumes stay bit-exact)."""

    exp_avg_dtype: str = "e4m3"
    exp_avg_sq_dtype: str = "fp16"
    master_dtype: str | None = "fp16"
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        check_rounding("OptimStateConfig", rounding=self.rounding, seed=0)
        names = state_format_names("OptimStateConfig", exp_avg_dtype=self.exp_avg_dtype,
                                   exp_avg_sq_dtype=self.exp_avg_sq_dtype, master_dtype=self.master_dtype)
        for field_name, name in names.items():
            object.__setattr__(self, field_name, name)  # frozen: a dtype becomes its name once, here


@dataclass(kw_only=True, slots=True)
class PrecisionConfig:
    """name:        the preset's label (fp32, bf16, fp8_o1, fp8_o2, fp8_o3), used in run names.
    gemm:        "fp32" | "bf16" | "fp8": precision of the Linear GEMMs (the output head stays in
                 high precision with fp8, see convert_to_fp8).
    grad_comm:   "native" (torch's all-reduce in the gradient dtype) | "fp8" (fp8train.comm: one
                 amax sync per bucket, FP8 on the wire, fp32 sums).
    optimizer:   "adamw" (torch.optim.AdamW) | "fp8_adamw" (fp8train.optim.Fp8AdamW, formats in
                 ``optim_state``).
    fp8_weights: FP8 primary weights: every Fp8Linear stores its weight as E4M3 + a power-of-two
                 scale (1 byte per element), the high-precision master lives only in Fp8AdamW,
                 which writes the FP8 weight after each step, and ZeRO owners (or FSDP2, from
                 1-byte shards) all-gather those codes; needs parallel zero1/zero2/fsdp2 and
                 fp8_adamw with a master.
    fp8_converter: with gemm="fp8", what replaces the Linear layers: "native" (Fp8Linear, GEMMs on
                 ``fp8.backend``) | "te" (Transformer Engine's Linear, CUDA only; forward under its
                 fp8_autocast with the recipe made from ``fp8``; its scaling state is in the
                 model's state_dict). See fp8train.te.
    fp8:         Fp8Linear settings (recipe, margin, backend, ...), used when gemm="fp8".
    comm:        FP8 gradient communication settings, used when grad_comm="fp8".
    optim_state: Fp8AdamW state formats.
    """

    name: str = "fp8_o2"
    gemm: Literal["fp32", "bf16", "fp8"] = "fp8"
    grad_comm: Literal["native", "fp8"] = "fp8"
    optimizer: Literal["adamw", "fp8_adamw"] = "fp8_adamw"
    fp8_weights: bool = False
    fp8_converter: Literal["native", "te"] = "native"
    fp8: Fp8Config = field(default_factory=Fp8Config)
    comm: Fp8CommConfig = field(default_factory=Fp8CommConfig)
    optim_state: OptimStateConfig = field(default_factory=OptimStateConfig)

    def __post_init__(self) -> None:
        if self.fp8_weights and self.optimizer != "fp8_adamw":
            raise ValueError(f"PrecisionConfig.fp8_weights=True needs optimizer='fp8_adamw' (got {self.optimizer!r}): "
                             "the owner keeps the high-precision master in Fp8AdamW")
        if self.fp8_weights and self.optimizer == "fp8_adamw" and self.optim_state.master_dtype is None:
            raise ValueError("PrecisionConfig.fp8_weights=True needs optim_state.master_dtype in "
                             "'fp16', 'bf16', 'fp32' (got None): the weights themselves become FP8")
        if self.fp8_weights and self.gemm != "fp8":
            raise ValueError(f"PrecisionConfig.fp8_weights=True needs gemm='fp8' (got {self.gemm!r})")
        if self.fp8_converter == "te":
            self._check_te()

    def _check_te(self) -> None:
        if self.gemm != "fp8":
            raise ValueError(f"PrecisionConfig.fp8_converter='te' needs gemm='fp8' (got {self.gemm!r}); "
                             f"allowed with gemm={self.gemm!r}: fp8_converter='native'")
        if self.fp8_weights:
            raise ValueError("PrecisionConfig.fp8_weights=True needs fp8_converter='native' (got 'te'): "
                             "ZeRO gathers the weights of Fp8Linear layers in FP8, TE casts its own")
        te_recipe_kwargs(self.fp8)  # TE has no 'constant' recipe: refused with the config, not at step 1


def apply_precision(model: nn.Module, cfg: PrecisionConfig,
                    device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """Convert ``model``'s linear layers in place for ``cfg.gemm``; returns a factory of the context
    each forward pass runs under: bf16 autocast on CUDA for gemm 'bf16' and 'fp8' (the FP8 presets
    are bf16 mixed precision plus FP8 GEMMs there, as in every peer: attention, norms, the head and
    the activations run in bf16), TE's fp8_autocast with fp8_converter='te', nothing elsewhere. On
    CPU the FP8 emulation keeps fp32 around its GEMMs (CPU bf16 kernels are slow and inexact)."""
    if cfg.gemm == "fp8":
        return _apply_fp8(model, cfg, device)
    if cfg.gemm == "bf16":
        if device.type == "cuda":
            return lambda: bf16_autocast(device)
        convert_to_bf16_emulated(model)  # bf16 GEMMs on CPU are ~100x slower than fp32: emulate
    return nullcontext


def _apply_fp8(model: nn.Module, cfg: PrecisionConfig,
               device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """Convert with the converter ``cfg.fp8_converter`` picks; returns the forward context factory."""
    if cfg.fp8_converter == "te":
        if not conversion_targets(model):
            _no_fp8_layer(model)
        convert_to_te(model, config=cfg.fp8)
        # TE reduces amaxes over fp8_group: with the world every rank holds the same amax history,
        # so the model.pt that one rank writes carries every rank's delayed-scaling state.
        return te_forward_context(cfg.fp8, fp8_group=dist.group.WORLD if dist.is_initialized() else None)
    convert_to_fp8(model, config=cfg.fp8, fp8_weights=cfg.fp8_weights)
    if not fp8_weight_names(model):
        _no_fp8_layer(model)
    if device.type == "cuda":
        return lambda: bf16_autocast(device)  # Fp8Linear returns the autocast dtype, bf16
    return nullcontext


def _no_fp8_layer(model: nn.Module) -> None:
    """gemm='fp8' that would convert nothing is a config mistake (an FP8 run that is all fp32), not
    a silent fallback: name the Linear shapes, none of whose both dims is a multiple of 16."""
    shapes = sorted({f"{m.in_features}x{m.out_features}" for m in model.modules() if isinstance(m, nn.Linear)})
    raise ConfigError(f"precision.gemm='fp8' but no Linear layer of the model is eligible for FP8: both dims "
                      f"(model.n_embd and the widths made from it) must be multiples of {FP8_DIM_MULTIPLE} "
                      f"(Linear in x out: {', '.join(shapes) or 'none'}; the output head stays high precision); "
                      "allowed: such dims, or precision.gemm='bf16' / 'fp32'")


def fp8_weight_names(model: nn.Module) -> list[str]:
    """Parameter names of the Fp8Linear weights (what ``fp8_weights`` gathers in FP8)."""
    return [f"{fqn}.weight" if fqn else "weight" for fqn, m in model.named_modules() if isinstance(m, Fp8Linear)]


def fp8_weight_layers(model: nn.Module) -> dict[str, Fp8Linear]:
    """{parameter name: layer} of the Fp8Linear layers that store their weight in FP8."""
    return {f"{fqn}.weight" if fqn else "weight": m for fqn, m in model.named_modules()
            if isinstance(m, Fp8Linear) and m.fp8_weight}
