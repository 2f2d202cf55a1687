"""FP8 post-training quantization (PTQ) for inference, and the language-model metrics to judge it.

``quantize_for_inference`` turns a model trained in high precision (fp32 ``nn.Linear`` or the
bf16 baseline's ``Bf16Linear``) into an FP8 inference model, in place, with one of the Graphcore paper's
two recipes (its Table 3 and Figure 5):

  "amax"   (FP8-AMAX)   per-tensor, just-in-time scaling: every input and weight is cast with the
                        bias floor(log2(448 / amax)) of that very tensor (``Fp8Config(recipe="current")``).
  "cscale" (FP8-CSCALE) one constant scaling bias k for every tensor: stored value x * 2**k, no amax at
                        all (``Fp8Config(recipe="constant", constant_bias=k)``).
With "amax", ``granularity=`` "rowwise" / "block" / "mx" scales per row or block instead
(``Fp8Config.granularity``, fp8train/blocks.py); the CSCALE sweep stays per tensor.

Numerics of a converted layer (``Fp8Linear``, forward only): the input x and the weight w are cast
to E4M3 (3 mantissa bits, max 448, smallest subnormal 2**-9) as clamp(x * 2**k, -448, 448) rounded to
nearest even; the GEMM multiplies the exact FP8 values and accumulates in fp32 (on CPU an exact
emulation: dequantize to fp32, fp32 matmul), and the result is rescaled by 2**-(kx + kw) (exact: a
power of two). With a constant bias the two ways to fail are visible directly:
  - too high a bias: |x| * 2**k > 448 saturates (clamps), so large activations and weights are lost;
  - too low a bias: |x| * 2**k < 2**-10 flushes to zero (underflow), so small values vanish.
``track_fp8_casts`` counts both, per role, while a model evaluates (ScalingState's own counters).

Kept in high precision: the output head by default (the logits feed a softmax over the vocabulary,
where 3 mantissa bits cost the most; frameworks keep it too), linear layers whose dims are not
multiples of 16, and everything that is not a linear layer (embeddings, norms, attention softmax).
The head keeps the precision the model was trained in (fp32, or emulated bf16 for a bf16 model), so
that only the converted layers differ from the high-precision reference.

A model that already holds ``Fp8Linear`` layers (trained in FP8) is refused: its layers carry the
scaling state of their training recipe, and silently replacing it would measure something else.
Evaluate such a model as trained, or load its weights into a freshly built high-precision model
(dropping the scaling state) and quantize that -- which is what ``fp8train-eval`` does.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from fp8train.config import GRANULARITIES, Fp8Config
from fp8train.convert import _output_head_fqn, convert_to_fp8, replace_submodules
from fp8train.linear import Fp8Linear
from fp8train.scaling import LOG2_SCALE_MAX, LOG2_SCALE_MIN
from fp8train.trainer.bf16 import Bf16Linear

__all__ = [
    # quantization
    "PTQ_RECIPES",
    "quantize_for_inference",
    # metrics
    "Fp8CastTally",
    "RoleTally",
    "evaluate_lm",
    "next_token_accuracy",
    "track_fp8_casts",
]

PTQ_RECIPES = ("amax", "cscale")


def _check_args(recipe: object, bias: object) -> None:
    if recipe not in PTQ_RECIPES:
        raise ValueError(f"quantize_for_inference: recipe={recipe!r} is not allowed; allowed values: "
                         + ", ".join(map(repr, PTQ_RECIPES)))
    if recipe == "amax" and bias is not None:
        raise ValueError(f"quantize_for_inference: bias={bias!r} is not allowed with recipe='amax' (the scale "
                         "comes from each tensor's amax); allowed: bias=None")
    if recipe == "cscale" and (isinstance(bias, bool) or not isinstance(bias, int)
                               or not LOG2_SCALE_MIN <= bias <= LOG2_SCALE_MAX):
        raise ValueError(f"quantize_for_inference: bias={bias!r} is not allowed with recipe='cscale'; allowed: "
                         f"an int in [{LOG2_SCALE_MIN}, {LOG2_SCALE_MAX}] (the log2 of the constant scale)")


def quantize_for_inference(model: nn.Module, *, recipe: str = "amax", bias: int | None = None,
                           skip_output_head: bool = True, granularity: str = "tensor") -> nn.Module:
    """Convert ``model``'s linear layers to FP8 for inference, in place; returns it in eval mode.

    recipe:           "amax" (FP8-AMAX, just-in-time per-tensor amax; ``bias`` must be None) or
                      "cscale" (FP8-CSCALE, the constant scaling bias ``bias`` for inputs and weights).
    bias:             cscale: log2 of the scale, an int in [LOG2_SCALE_MIN, LOG2_SCALE_MAX].
    skip_output_head: keep the output head (the last linear layer) in its trained precision.
    granularity:      amax: what one scale covers, ``Fp8Config.granularity`` ("tensor", "rowwise",
                      "block", "mx"); cscale stays per tensor (one bias for the whole sweep).

    Converted: every ``nn.Linear`` and ``Bf16Linear`` with both dims multiples of 16 (see
    ``convert_to_fp8``); parameters are shared, not copied. ValueError (one line) for bad arguments
    or a model that already has ``Fp8Linear`` layers (see the module docstring).
    """
    _check_args(recipe, bias)
    if granularity not in GRANULARITIES:
        raise ValueError(f"quantize_for_inference: granularity={granularity!r} is not allowed; allowed values: "
                         + ", ".join(map(repr, GRANULARITIES)))
    if recipe == "cscale" and granularity != "tensor":
        raise ValueError(f"quantize_for_inference: granularity={granularity!r} is not allowed with recipe='cscale' "
                         "(one constant bias per tensor); allowed: granularity='tensor'")
    n_fp8 = sum(isinstance(m, Fp8Linear) for m in model.modules())
    if n_fp8:
        raise ValueError(f"quantize_for_inference: the model already has {n_fp8} Fp8Linear layers (trained in FP8); "
                         "evaluate it as trained, or load its weights into a high-precision model and quantize that")
    config = (Fp8Config(recipe="current", granularity=granularity) if recipe == "amax"
              else Fp8Config(recipe="constant", constant_bias=bias))
    head = _output_head_fqn(model) if skip_output_head else None
    # Bf16Linear -> plain nn.Linear on the same Parameters, so that convert_to_fp8 sees only plain
    # linears; the head (when skipped) stays a Bf16Linear, as trained.
    bf16 = [fqn for fqn, m in model.named_modules() if isinstance(m, Bf16Linear) and fqn != head]
    replace_submodules(model, bf16, _plain_linear)
    convert_to_fp8(model, config=config, skip_output_head=skip_output_head)
    return model.eval()


def _plain_linear(layer: nn.Linear) -> nn.Linear:
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight, plain.bias = layer.weight, layer.bias
    return plain


def next_token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy: the share of positions whose highest logit is the target token.
    logits (B, T, V), targets (B, T). Ties go to the lowest token id (``argmax``)."""
    return float((logits.argmax(-1) == targets).double().mean())


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(mean loss, top-1 next-token accuracy) of ``model`` over fixed ``(inputs, targets)`` batches,
    each (B, T) int64; every token weighs the same. ``model(idx, targets)`` returns (logits, loss)
    with loss the mean cross-entropy over the batch. Runs in eval mode (restored afterwards), on the
    device of the model's parameters."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = correct = n_tokens = 0.0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits, loss = model(x, y)                                     # (B, T, V), mean over B*T
            loss_sum += float(loss.double()) * y.numel()
            correct += float((logits.argmax(-1) == y).sum())
            n_tokens += y.numel()
    finally:
        model.train(was_training)
    if n_tokens == 0:
        raise ValueError("evaluate_lm: no batches (or only empty ones) to evaluate")
    return loss_sum / n_tokens, correct / n_tokens


@dataclass(slots=True)
class RoleTally:
    """Cast counts of one tensor role (inputs or weights) over every converted layer and forward.

    numel / saturated / underflowed: elements cast, |x * scale| > 448 (clamped), x != 0 flushed to 0.
    log2_scale_min / max: the range of scaling biases used (AMAX: chosen per tensor; CSCALE: the one).
    """

    numel: int = 0
    saturated: int = 0
    underflowed: int = 0
    log2_scale_min: float = math.inf
    log2_scale_max: float = -math.inf

    @property
    def saturated_fraction(self) -> float:
        return self.saturated / self.numel if self.numel else 0.0

    @property
    def underflowed_fraction(self) -> float:
        return self.underflowed / self.numel if self.numel else 0.0

    def _note_log2_scale(self, log2_scale: torch.Tensor) -> None:
        value = float(log2_scale)
        self.log2_scale_min = min(self.log2_scale_min, value)
        self.log2_scale_max = max(self.log2_scale_max, value)

    def as_dict(self) -> dict[str, float | int | None]:
        seen = self.numel > 0
        return {"numel": self.numel, "saturated_fraction": self.saturated_fraction,
                "underflowed_fraction": self.underflowed_fraction,
                "log2_scale_min": self.log2_scale_min if seen else None,
                "log2_scale_max": self.log2_scale_max if seen else None}


@dataclass(slots=True)
class Fp8CastTally:
    """What ``track_fp8_casts`` counted: ``input`` and ``weight`` ``RoleTally``s."""

    input: RoleTally = field(default_factory=RoleTally)
    weight: RoleTally = field(default_factory=RoleTally)

    def as_dict(self) -> dict[str, dict[str, float | int | None]]:
        return {"input": self.input.as_dict(), "weight": self.weight.as_dict()}


_COUNTERS = (("numel", "stat_numel"), ("saturated", "stat_saturated"), ("underflowed", "stat_underflowed"))


@contextlib.contextmanager
def track_fp8_casts(model: nn.Module) -> Iterator[Fp8CastTally]:
    """Count saturated and flushed elements of every ``Fp8Linear`` input and weight cast while
    inside; the tally's counts are filled in when the block exits.

    The counting is ScalingState's own (``sample_stats``: counted in the cast itself); the counters
    are read as differences, so a monitor's counts are left as they were, and so is
    ``sample_stats``. A forward hook records the scaling bias each layer has just used (after the
    forward, ``log2_scale`` holds it for the "current" and "constant" recipes; "delayed" has moved
    on to the next cast's, so it is refused with ValueError).
    """
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    if any(m.config.recipe == "delayed" for m in layers):
        raise ValueError("track_fp8_casts: recipe='delayed' layers update their scale after the cast; "
                         "allowed recipes: 'current', 'constant'")
    tally = Fp8CastTally()
    roles = [(tally.input, m.input_scaling) for m in layers] + [(tally.weight, m.weight_scaling) for m in layers]
    before = [(state.sample_stats, {c: int(getattr(state, c)) for _, c in _COUNTERS}) for _, state in roles]

    def hook(layer: Fp8Linear, _args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        tally.input._note_log2_scale(layer.input_scaling.log2_scale)
        tally.weight._note_log2_scale(layer.weight_scaling.log2_scale)

    handles = [m.register_forward_hook(hook) for m in layers]
    for _, state in roles:
        state.sample_stats = True
    try:
        yield tally
    finally:
        for h in handles:
            h.remove()
        for (role, state), (sampling, counts) in zip(roles, before):
            state.sample_stats = sampling
            for field_name, counter in _COUNTERS:
                setattr(role, field_name, getattr(role, field_name) + int(getattr(state, counter)) - counts[counter])
