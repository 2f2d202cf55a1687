"""``Fp8Config``: how Fp8Linear scales and multiplies. Typed, validated at construction, frozen."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from fp8train._validate import check_choice, check_int_range, check_type
from fp8train.formats import FP8_DTYPES, FP8_FORMATS, Fp8Format, format_by_name
from fp8train.scaling import LOG2_SCALE_MAX, LOG2_SCALE_MIN

__all__ = ["AMAX_ALGOS", "BACKENDS", "GRANULARITIES", "RECIPES", "Fp8Config"]

RECIPES = ("current", "delayed", "constant")
GRANULARITIES = ("tensor", "rowwise", "block", "mx")
AMAX_ALGOS = ("max", "most_recent")
BACKENDS = ("auto", "emulated", "scaled_mm")


@dataclass(frozen=True, kw_only=True, slots=True)
class Fp8Config:
    """FP8 settings of every converted linear layer. Frozen: a layer reads ``backend`` at every
    forward while its ScalingStates copy ``recipe`` / ``margin`` once, so a change after construction
    would take effect halfway; build another with ``dataclasses.replace`` (validated anew).

    recipe:             scale source for inputs, weights and output gradients:
                        "current"  (FP8-AMAX) amax of the tensor being cast, just in time;
                        "delayed"  scale from an amax history of the last ``amax_history_len``
                                   casts (the first cast, with no history, uses its own amax);
                        "constant" (FP8-CSCALE) fixed scale 2**constant_bias (amax only checked for inf/nan).
    amax_history_len:   delayed recipe: history length L in casts (>= 1).
    amax_compute_algo:  delayed recipe: "max" over the history or its "most_recent" entry.
    margin:             extra powers of two of headroom: log2_scale = floor(log2(fmax/amax)) - margin.
    constant_bias:      constant recipe: the scaling bias (log2 of the scale), same for every role.
    backend:            GEMM engine: "emulated" (fp32 matmul of exact FP8 values, any device),
                        "scaled_mm" (torch._scaled_mm: CUDA sm89+, and CPU in torch >= 2.13),
                        "auto" (scaled_mm on CUDA sm89+, else emulated). Transformer Engine,
                        which replaces whole layers, is a converter instead: fp8train.convert_to_te.
    grad_output_format: format of output gradients: "e5m2" (default: gradients need range more
                        than precision) or "e4m3" (allowed, with a warning: gradients beyond
                        448 / scale saturate). torch.float8_e5m2 / torch.float8_e4m3fn are
                        accepted too and stored as the name.
    fast_cast:          use the compiled CPU cast kernel for large tensors (bit-identical to the
                        eager cast; off only to avoid torch.compile start-up cost).
    granularity:        what one power-of-two scale covers (fp8train/blocks.py, docs/design.md):
                        "tensor"  the whole tensor (default; the Graphcore paper's scaling bias);
                        "rowwise" one row of each GEMM operand along the GEMM's reduction dim;
                        "block"   1x128 tiles of inputs and output gradients, 128x128 blocks of
                                  weights (DeepSeek-V3, Transformer Engine's Float8BlockScaling);
                        "mx"      blocks of 32 along the reduction dim, scales stored as E8M0
                                  (torch.float8_e8m0fnu; OCP MX, Blackwell-native).
                        Finer than "tensor" needs recipe="current" (a just-in-time amax per block;
                        anything else is a config error), fp8_weight=False, and backend "auto" or
                        "emulated" ("scaled_mm" also runs "rowwise").
    """

    recipe: str = "current"
    amax_history_len: int = 16
    amax_compute_algo: str = "max"
    margin: int = 0
    constant_bias: int = 0
    backend: str = "auto"
    grad_output_format: str = "e5m2"
    fast_cast: bool = True
    granularity: str = "tensor"

    def __post_init__(self) -> None:
        owner = "Fp8Config"
        if isinstance(self.grad_output_format, torch.dtype) and self.grad_output_format in FP8_DTYPES:
            # YAML and wandb see the name; frozen, so the one normalisation goes through object.__setattr__
            object.__setattr__(self, "grad_output_format", FP8_DTYPES[self.grad_output_format].name)
        check_choice(owner, "recipe", self.recipe, RECIPES)
        check_int_range(owner, "amax_history_len", self.amax_history_len, 1, 1 << 16)
        check_choice(owner, "amax_compute_algo", self.amax_compute_algo, AMAX_ALGOS)
        check_int_range(owner, "margin", self.margin, 0, 64)
        check_int_range(owner, "constant_bias", self.constant_bias, LOG2_SCALE_MIN, LOG2_SCALE_MAX)
        if self.backend == "te":  # Transformer Engine replaces whole layers: a converter of its own
            raise ValueError("Fp8Config.backend='te' is not a GEMM backend: Transformer Engine is a converter, "
                             "fp8train.convert_to_te(model, config=...) (trainer: precision.fp8_converter=te); "
                             f"allowed backends: {', '.join(map(repr, BACKENDS))}")
        check_choice(owner, "backend", self.backend, BACKENDS)
        check_choice(owner, "grad_output_format", self.grad_output_format, tuple(FP8_FORMATS))
        check_type(owner, "fast_cast", self.fast_cast, bool)
        check_choice(owner, "granularity", self.granularity, GRANULARITIES)
        if self.granularity != "tensor" and self.recipe != "current":
            raise ValueError(f"Fp8Config.granularity={self.granularity!r} needs recipe='current' (a just-in-time "
                             f"amax per row/block), got recipe={self.recipe!r}; allowed with it: 'tensor'")
        if self.granularity in ("block", "mx") and self.backend == "scaled_mm":
            raise ValueError(f"Fp8Config.backend='scaled_mm' runs granularity 'tensor' or 'rowwise' only, got "
                             f"granularity={self.granularity!r}; allowed backends for it: 'auto', 'emulated'")
        if self.grad_output_format == "e4m3":
            warnings.warn("Fp8Config.grad_output_format='e4m3': output gradients get 3 mantissa bits "
                          "but only 2**17.8 of range; expect more saturation/underflow than 'e5m2'",
                          UserWarning, stacklevel=3)

    @property
    def grad_output_fp8(self) -> Fp8Format:
        return format_by_name(self.grad_output_format)
