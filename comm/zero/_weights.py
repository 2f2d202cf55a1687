"""The weight all-gather of whole-tensor ZeRO (docs/design.md): after the owners' optimizer step, ONE
all-gather of equally sized uint8 slots gives every rank every parameter's new value.

Slot layout, planned once (``plan_weight_slots``): rank r's slot holds the parameters it owns in
(owner, index) order, each starting at a multiple of 16 bytes (so that any dtype can be viewed
there), padded to the largest rank's slot. One parameter takes
  - lossless:  numel * element_size bytes, its own dtype's bytes (a uint8 view: bit for bit);
  - FP8:       4 bytes of fp32 scale_inv, then numel bytes of E4M3 codes (``fp8_weight_names``).
Only the owner writes a parameter's bytes; receivers of lossless parameters copy them, and EVERY rank,
the owner included, sets an FP8 parameter to its decoded value, so all ranks hold the same bits.

FP8 encoding on the owner (``encode_fp8_weights_``), the project's scaling pipeline: amax of the new
weight (``tensor_to_amax``) -> power-of-two scale (``amax_to_log2_scale``, margin 0: the amax maps
just under 448) -> E4M3 cast (``cast_to_fp8``: round to nearest even, clamp to +-448). amax cases:
  - amax > 0 and finite: a fresh scale; the cast is the only rounding (relative error <= 2**-4,
    elements below amax * 2**-17 flush to 0);
  - amax 0 (an all-zero weight): the previous scaling bias is kept (per owned FP8 parameter, a 0-d
    fp32 buffer, initially 0, i.e. scale 1; saved in checkpoints); the codes are zeros anyway;
  - amax inf or nan: the previous bias is kept; inf is clamped to +-448 * scale_inv and NaN stays
    NaN on the owner. Not reachable with the required inner optimizer: ``Fp8AdamW`` skips a step that
    would write a non-finite weight. (A NaN code may decode differently on the fast decode path, but
    every rank takes the same path for the same tensor, so the ranks still agree.)
Decoding (``decode_fp8_into``): code * scale_inv in fp32, exact (a power of two), rounded once to the
parameter's dtype: exact in fp32 always (scale_inv >= 2**-126 keeps code bits above 2**-149), in
bf16 unless the amax is below ~2**-116; see comm/zero/optimizer.py for fp16 parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from fp8train._decode_cpu import decode_fp8_into
from fp8train.cast import cast_to_fp8
from fp8train.formats import E4M3
from fp8train.optim import Fp8AdamW
from fp8train.scaling import amax_to_log2_scale, tensor_to_amax

__all__ = ["WeightGather", "encode_fp8_weights_", "inner_master_problem", "plan_weight_slots", "slot_nbytes"]

# every parameter starts at a multiple of this many bytes in a weight slot, so that the uint8 buffer
# can be viewed as any dtype at that offset
SLOT_ALIGN_BYTES = 16
# an FP8 parameter's fp32 scale_inv, in front of its codes (at an aligned offset: viewable as fp32)
SCALE_INV_BYTES = 4


def slot_nbytes(p: torch.Tensor, fp8: bool) -> int:
    """Bytes parameter ``p`` puts in its owner's slot, before alignment."""
    return SCALE_INV_BYTES + p.numel() if fp8 else p.numel() * p.element_size()


def plan_weight_slots(nbytes: Sequence[int], owner: Sequence[int], order: Sequence[int],
                      world_size: int) -> tuple[list[int], int]:
    """Byte offset of each parameter inside its owner's slot (parameters placed in ``order``), and
    the slot size: the largest rank's bytes, each parameter aligned to SLOT_ALIGN_BYTES."""
    offsets = [0] * len(nbytes)
    used = [0] * world_size
    for i in order:
        r = owner[i]
        offsets[i] = used[r]
        used[r] += -(-nbytes[i] // SLOT_ALIGN_BYTES) * SLOT_ALIGN_BYTES
    return offsets, max(used)


def inner_master_problem(optimizer: torch.optim.Optimizer) -> str | None:
    """None if ``optimizer`` keeps its own master weight, else what it is instead.

    Why a master is required, and why ``Fp8AdamW`` with one is safe (read in optim/adamw.py,
    _bucket.py, _eager.py and csrc/fp8adamw.c): such an optimizer reads a parameter's value exactly
    once, in ``_init_state`` at the parameter's first step, to encode the initial master. From then
    on both passes take the weight from ``state["master"]`` (``Bucket._weights()`` returns the
    masters; the C kernel's ``step_block`` and ``vector_range`` load ``a->master[t]`` whenever
    master_dtype is not none), weight decay included, and pass 2 only WRITES the parameter (the new
    master, decoded and rounded to the parameter's dtype). ``load_state_dict`` reads only the
    parameter's shape. So overwriting a parameter with its E4M3 rounding between steps does not feed
    back into training. Without a master (master_dtype=None, torch.optim.AdamW, ...) the parameter
    IS the optimizer's weight: every step would restart from the rounded value, and any update below
    E4M3's half-ulp (up to 2**-4 |w|) would be lost."""
    if not isinstance(optimizer, Fp8AdamW):
        return f"{type(optimizer).__name__}, which updates the parameter itself"
    if optimizer.state_formats["master"] is None:
        return "Fp8AdamW with master_dtype=None"
    return None


def encode_fp8_weights_(weights: Sequence[torch.Tensor], log2_scales: Sequence[torch.Tensor],
                        codes_out: Sequence[torch.Tensor], scale_inv_out: Sequence[torch.Tensor]) -> None:
    """E4M3 codes of each weight into ``codes_out`` (float8_e4m3fn tensors of the weight's shape)
    and its fp32 scale_inv into ``scale_inv_out`` (0-d); ``log2_scales`` (0-d fp32, the previous
    scaling biases) are updated in place. One amax per tensor, one scale computation for all."""
    if not weights:
        return
    amax = torch.stack([tensor_to_amax(w) for w in weights])
    log2 = amax_to_log2_scale(amax, E4M3, prev_log2_scale=torch.stack(list(log2_scales)))
    torch._foreach_copy_(list(log2_scales), list(log2.unbind(0)))
    for w, out, scale in zip(weights, codes_out, torch.exp2(log2).unbind(0)):
        cast_to_fp8(w.detach(), scale, E4M3, out=out)
    torch._foreach_copy_(list(scale_inv_out), list(torch.exp2(-log2).unbind(0)))


class WeightGather:
    """The weight all-gather of one ``ZeroOptimizer`` (see the module docstring).

    params / owner: every parameter and its owner rank; order: the slot order, (owner, index);
    fp8[i]: parameter i travels as E4M3. ``log2_scales``: {index: 0-d fp32 scaling bias} of the FP8
    parameters this rank owns, the scale kept when the amax is 0, inf or nan."""

    def __init__(self, params: Sequence[torch.Tensor], owner: Sequence[int], order: Sequence[int],
                 fp8: Sequence[bool], *, rank: int, world_size: int, group: dist.ProcessGroup | None) -> None:
        self.params, self.owner, self.fp8 = list(params), list(owner), list(fp8)
        self.rank, self.world_size, self.group = rank, world_size, group
        nbytes = [slot_nbytes(p, f) for p, f in zip(self.params, self.fp8)]
        self.offsets, self.slot_bytes = plan_weight_slots(nbytes, self.owner, order, world_size)
        self._owned = [i for i in order if self.owner[i] == rank]
        self._fp8_all = [i for i in range(len(self.params)) if self.fp8[i]]
        device = self.params[0].device
        self.log2_scales = {i: torch.zeros((), dtype=torch.float32, device=device)
                            for i in self._owned if self.fp8[i]}

    def _raw(self, slot: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        start = self.offsets[i]
        return slot[start:start + p.numel() * p.element_size()].view(p.dtype).view(p.shape)

    def _scale_inv(self, slot: torch.Tensor, i: int) -> torch.Tensor:
        start = self.offsets[i]  # 16-aligned: viewable as fp32
        return slot[start:start + SCALE_INV_BYTES].view(torch.float32).view(())

    def _codes(self, slot: torch.Tensor, i: int) -> torch.Tensor:
        start = self.offsets[i] + SCALE_INV_BYTES
        return slot[start:start + self.params[i].numel()]

    @torch.no_grad()
    def all_gather_(self) -> int:
        """Pack this rank's parameters, all-gather, unpack everyone's; returns the bytes this rank
        sent, counted as ``CommStats`` counts an all-gather: the chunks of the other N - 1 ranks."""
        if self.slot_bytes == 0:
            return 0
        device = self.params[0].device
        mine = torch.zeros(self.slot_bytes, dtype=torch.uint8, device=device)
        for i in self._owned:
            if not self.fp8[i]:
                self._raw(mine, i).copy_(self.params[i])
        fp8_owned = [i for i in self._owned if self.fp8[i]]
        encode_fp8_weights_([self.params[i] for i in fp8_owned], [self.log2_scales[i] for i in fp8_owned],
                            [self._codes(mine, i).view(E4M3.dtype).view(self.params[i].shape) for i in fp8_owned],
                            [self._scale_inv(mine, i) for i in fp8_owned])
        gathered = torch.empty(self.world_size * self.slot_bytes, dtype=torch.uint8, device=device)
        # all_gather_single is the newer name (torch >= 2.12); all_gather_into_tensor before it
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(gathered, mine, group=self.group)
        slots = gathered.split(self.slot_bytes)
        for i, p in enumerate(self.params):
            if not self.fp8[i] and self.owner[i] != self.rank:
                p.copy_(self._raw(slots[self.owner[i]], i))
        for i in self._fp8_all:  # the owner too: it must hold the decoded value, like everyone else
            p, slot = self.params[i], slots[self.owner[i]]
            out = p.view(-1) if p.is_contiguous() else torch.empty(p.numel(), dtype=p.dtype, device=device)
            decode_fp8_into(self._codes(slot, i), E4M3, self._scale_inv(slot, i), out)
            if not p.is_contiguous():
                p.copy_(out.view(p.shape))
        return (self.world_size - 1) * self.slot_bytes
