"""``ScalingState``: the scale of one tensor role (input, weight, grad_output) of one layer.

An ``nn.Module`` so that its buffers (amax history, scale, event counters) travel with the model's
``state_dict``: delayed scaling is only resumable if its history is checkpointed. Every update is
tensor arithmetic (no ``.item()``): counters are read when a monitor samples them. Buffers are
updated in place (``add_``/``copy_``, never rebound), so torch.compile traces a whole converted
model, these updates included (in the backward too), with no graph break.

Overflow must never vanish. The cast clamps +-inf to +-fmax (fp8train/cast.py), so an inf in a GEMM
operand would otherwise leave the GEMM's output finite, and the step would be taken with gradients
computed as if the inf were fmax. Numerical decision: when a cast's amax is inf or NaN (every recipe
computes the amax, the constant one too, for this check alone), the ``Fp8Tensor`` returned carries a
NaN ``scale_inv``. Every GEMM that uses it multiplies by that scale_inv (``emulated`` and
``torch._scaled_mm`` alike), so its whole output is NaN, and every ordinary check downstream sees the
overflow: the FP8 all-reduce's ``found_inf``, ZeRO's, ``clip_grad_norm_(error_if_nonfinite=True)``, a
``GradScaler``. No host synchronisation (a ``torch.where`` on the 0-d amax). The state itself stays
finite: the previous scale is kept, the event is counted in ``n_amax_nonfinite``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fp8train.blocks import block_cast_stats, quantize_blocks
from fp8train.cast import Fp8CastStats, cast_to_fp8, cast_to_fp8_fused, cast_to_fp8_with_transpose, quantization_stats
from fp8train.config import Fp8Config
from fp8train.formats import Fp8Format, as_fp8_format
from fp8train.scaling import amax_to_log2_scale, tensor_to_amax
from fp8train.tensor import Fp8Tensor

__all__ = ["ScalingState"]

_STAT_BUFFERS = ("stat_numel", "stat_nonzero", "stat_saturated", "stat_underflowed")


def _counts(stats: Fp8CastStats, x_hp: torch.Tensor) -> torch.Tensor:
    """(4,) int64 in the order of ``ScalingState.add_cast_counts_``: elements, nonzero, saturated, underflowed."""
    return torch.stack([torch.as_tensor(stats.numel, device=x_hp.device), (x_hp != 0).sum(),
                        stats.saturated, stats.underflowed]).to(torch.int64)


class ScalingState(nn.Module):
    """Buffers:
    amax_history:     (L,) fp32, most recent first; zeros before L casts have happened (zeros never
                      win a max, so the warm-up needs no special case). Non-finite amaxes are
                      recorded as 0 so one overflow does not freeze the scale for L steps.
    log2_scale:       () fp32, scaling bias used by the next cast (delayed) / the last (current).
    n_casts:          () int64, casts so far (every recipe).
    n_amax_zero:      () int64, casts whose amax was 0 (previous scale kept).
    n_amax_nonfinite: () int64, casts whose amax was inf/nan (previous scale kept; overflow).

    Monitoring (non-persistent, not checkpointed): while ``sample_stats`` is True every cast also
    counts its elements into ``stat_numel``, ``stat_nonzero``, ``stat_saturated`` (|x * scale| >
    fmax, clamped) and ``stat_underflowed`` (x != 0 that became 0): a few extra passes over the
    tensor, so a monitor switches it on only for sampled steps (``reset_stats`` zeroes the counts).
    Finer granularities (``quantize(..., block=...)``) also keep ``stat_block_bias`` (3,) fp32: the
    min and max block bias over the sampled casts and the median of the last one (0 before one).

    Finer granularities (``Fp8Config.granularity``, recipe "current"): each cast has one bias per
    row/block (fp8train/blocks.py); ``log2_scale`` holds the tensor's (its largest block's, the min
    block bias), ``amax_history`` the tensor's amax, so the persistent state (what a checkpoint holds)
    is the per-tensor one. An operand cast once per GEMM layout counts once per cast in ``n_casts``.
    """

    def __init__(self, fmt: Fp8Format | torch.dtype | str, config: Fp8Config, *,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.fmt = as_fp8_format(fmt)
        self.recipe = config.recipe
        self.margin = config.margin
        self.amax_compute_algo = config.amax_compute_algo
        self.fast_cast = config.fast_cast
        self.e8m0_scales = config.granularity == "mx"
        history_len = config.amax_history_len if config.recipe == "delayed" else 1
        initial_log2 = float(config.constant_bias) if config.recipe == "constant" else 0.0
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.register_buffer("amax_history", torch.zeros(history_len, **f32))
        self.register_buffer("log2_scale", torch.tensor(initial_log2, **f32))
        self.register_buffer("n_casts", torch.zeros((), **i64))
        self.register_buffer("n_amax_zero", torch.zeros((), **i64))
        self.register_buffer("n_amax_nonfinite", torch.zeros((), **i64))
        self.sample_stats = False
        # Python mirror of n_casts > 0 for the delayed recipe (see ``quantize``); follows load_state_dict
        self.has_history = False
        for name in _STAT_BUFFERS:
            self.register_buffer(name, torch.zeros((), **i64), persistent=False)
        self.register_buffer("stat_block_bias", torch.zeros(3, **f32), persistent=False)

    def reset_stats(self) -> None:
        for name in _STAT_BUFFERS:
            getattr(self, name).zero_()
        self.stat_block_bias.zero_()

    def _count(self, x_hp: torch.Tensor, scale: torch.Tensor, x_fp8: torch.Tensor,
               stats: Fp8CastStats | None = None) -> None:
        stats = quantization_stats(x_hp, scale, x_fp8, self.fmt) if stats is None else stats
        self.add_cast_counts_(_counts(stats, x_hp))

    @staticmethod
    def cast_counts(x_hp: torch.Tensor, scale: torch.Tensor, x_fp8: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
        """(4,) int64: elements, nonzero, saturated, underflowed of one cast: what ``sample_stats`` adds up,
        for a cast made in pieces (FSDP2 shards) whose counts are summed over the ranks first."""
        return _counts(quantization_stats(x_hp, scale, x_fp8, fmt), x_hp)

    def add_cast_counts_(self, counts: torch.Tensor) -> None:
        """Add ``cast_counts`` (possibly summed over shards) to the sampled statistics."""
        for buf, count in zip((self.stat_numel, self.stat_nonzero, self.stat_saturated, self.stat_underflowed),
                              counts.unbind(0)):
            buf.add_(count)

    def extra_repr(self) -> str:
        return f"fmt={self.fmt.name}, recipe={self.recipe}, history={self.amax_history.numel()}"

    @property
    def scale(self) -> torch.Tensor:
        return torch.exp2(self.log2_scale)

    def _history_amax(self) -> torch.Tensor:
        if self.amax_compute_algo == "most_recent":
            return self.amax_history[0]
        return self.amax_history.max()

    def _record(self, amax: torch.Tensor) -> None:
        finite = torch.isfinite(amax)
        self.n_casts.add_(1)
        self.n_amax_zero.add_((amax == 0).to(torch.int64))
        self.n_amax_nonfinite.add_((~finite).to(torch.int64))
        recorded = torch.where(finite, amax, torch.zeros_like(amax))
        self.amax_history.copy_(torch.cat([recorded.reshape(1), self.amax_history[:-1]]))

    @torch.no_grad()
    def record_cast_(self, amax: torch.Tensor, log2_scale: torch.Tensor) -> None:
        """Record a cast made elsewhere with this role's recipe (a ZeRO owner's FP8 weight, received
        as codes): its amax enters the history and counters, its scaling bias becomes the current one."""
        self._record(amax.to(torch.float32).reshape(()))
        self.log2_scale.copy_(log2_scale)
        self.has_history = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.n_casts.device.type != "meta":  # one host read, at load time
            self.has_history = bool(self.n_casts > 0)

    @torch.no_grad()
    def quantize_blocks(self, x_hp: torch.Tensor, block: tuple[int, int]) -> Fp8Tensor:
        """Cast a 2-D ``x_hp`` with one scale per ``block`` (rows, cols; 0 = whole dim; recipe
        "current", fp8train/blocks.py) and update the state with the tensor's amax and bias."""
        cast = quantize_blocks(x_hp, self.fmt, block, margin=self.margin, e8m0=self.e8m0_scales,
                               prev_log2_scale=self.log2_scale)
        biases = cast.block_log2_scale.flatten()
        if self.sample_stats and biases.numel():
            first = self.stat_numel == 0  # the first sampled cast since reset_stats
            last = torch.stack([biases.min(), biases.median(), biases.max()])
            prev = self.stat_block_bias
            self.stat_block_bias.copy_(torch.stack([
                torch.where(first, last[0], torch.minimum(prev[0], last[0])), last[1],
                torch.where(first, last[2], torch.maximum(prev[2], last[2]))]))
            self._count(x_hp, None, cast.tensor.data, stats=block_cast_stats(x_hp, cast))
        self._record(cast.amax)
        self.log2_scale.copy_(cast.log2_scale)
        return cast.tensor

    @torch.no_grad()
    def quantize(self, x_hp: torch.Tensor, *, has_history: bool | None = None, transposed: bool = False) -> Fp8Tensor:
        """Cast ``x_hp`` with this role's scale and update the state (see the recipes in Fp8Config).
        A non-finite amax gives a NaN ``scale_inv`` (module docstring): the overflow reaches the GEMM.

        Delayed recipe, one pass: once ``self.has_history`` is set (by the first cast, or by loading
        a state with casts), the cast uses the stored scale alone, so it does not wait for this
        tensor's amax, and a compiler fuses amax and cast into one read of ``x_hp`` (inductor does).
        Before that (the very first cast, which has no history) the scale comes from this tensor's
        own amax: a second pass. ``has_history`` (a bool) overrides the flag for this cast and leaves
        it unchanged: Fp8Linear casts output gradients inside a compiled backward, where a Python
        attribute cannot change, and decides from its forward instead.
        ``transposed``: also write the codes transposed (``Fp8Tensor.data_t``; 2-D ``x_hp``)."""
        # The scale before the data: the constant recipe and the delayed one with a history need no
        # amax for it (only to see inf/nan, and for the history), so amax and cast are one pass
        # (cast_to_fp8_fused: one Triton kernel on CUDA). The others need this tensor's amax first.
        delayed_one_pass = self.recipe == "delayed" and (self.has_history if has_history is None else has_history)
        one_pass = self.recipe == "constant" or delayed_one_pass
        if one_pass:
            log2_scale = self.log2_scale.clone()  # the value before the update below
        else:
            amax = tensor_to_amax(x_hp)
            log2_scale = amax_to_log2_scale(amax, self.fmt, margin=self.margin, prev_log2_scale=self.log2_scale)
            if self.recipe == "delayed":  # no history yet: the very first cast uses its own amax
                log2_scale = torch.where(self.n_casts > 0, self.log2_scale, log2_scale)
        # Order matters under torch.compile (the values do not):
        #  - the scales and the cast come before any buffer write: inductor then fuses a one-pass
        #    cast with its amax reduction into one loop over x_hp (its C++ backend, measured; written
        #    after the writes, it makes two passes);
        #  - nothing reads log2_scale (a clone of a buffer) after that buffer's write: in a compiled
        #    backward (AOTAutograd, buffer written in the backward) such a read saw the new value,
        #    which halved an output gradient's dequantization.
        scale, scale_inv = torch.exp2(log2_scale), torch.exp2(-log2_scale)
        if one_pass:
            x_fp8, x_fp8_t, amax = cast_to_fp8_fused(x_hp, scale, self.fmt, fast=self.fast_cast, transposed=transposed)
        elif transposed:
            x_fp8, x_fp8_t = cast_to_fp8_with_transpose(x_hp, scale, self.fmt, fast=self.fast_cast)
        else:
            x_fp8, x_fp8_t = cast_to_fp8(x_hp, scale, self.fmt, fast=self.fast_cast), None
        scale_inv = torch.where(torch.isfinite(amax), scale_inv, torch.full_like(scale_inv, math.nan))
        if self.sample_stats:
            self._count(x_hp, scale, x_fp8)
        self._record(amax)
        if self.recipe == "current":
            self.log2_scale.copy_(log2_scale)
        elif self.recipe == "delayed":
            self.log2_scale.copy_(amax_to_log2_scale(self._history_amax(), self.fmt, margin=self.margin,
                                                     prev_log2_scale=log2_scale))
            if has_history is None:
                self.has_history = True
        return Fp8Tensor(data=x_fp8, scale_inv=scale_inv, orig_dtype=x_hp.dtype, data_t=x_fp8_t)
