"""The weight all-gather of whole-tensor ZeRO (docs/design.md): after the owners' optimizer step,
all-gathers of equally sized uint8 slots, one per bucket, give every rank every parameter's new value.

Slot layout, planned once (``plan_weight_buckets``): rank r's parameters, in (owner, index) order,
are cut into consecutive runs of at most ``bucket_bytes`` each (``Fp8CommConfig.bucket_bytes``, the
knob the gradient buckets use; a parameter larger than that is a run of its own); bucket b holds
every rank's b-th run (nothing, for a rank with fewer runs), and its slot size is its largest run,
so that bucket's all-gather moves N x (slot size) bytes. Each parameter starts at a multiple of 16
bytes in its slot (so that any dtype can be viewed there). One parameter takes
  - lossless:  numel * element_size bytes, its own dtype's bytes (a uint8 view: bit for bit);
  - FP8:       4 bytes of fp32 scale_inv, then numel bytes of E4M3 codes (``fp8_weight_names``).
  - FP8 primary weight (``layers``: an ``Fp8Linear(fp8_weight=True)``): the same payload, the codes and
    scale_inv the owner's optimizer wrote into its layer, copied into every other rank's layer; with
    finer scales (``Fp8Config.granularity``) its scale_inv is one per block (fp32, or 1-byte E8M0 for
    "mx"), and those bytes take the 4 bytes' place.
Only the owner writes a parameter's bytes; receivers of lossless parameters copy them, and EVERY rank,
the owner included, sets an FP8 parameter to its decoded value (an FP8 primary weight: its layer to
the codes), so all ranks hold the same bits.
Buckets change where bytes lie, never which bytes: the result is the same as one whole-model bucket.
Memory: one bucket's temporaries (its slot and the N x slot gather buffer) have their storage
released (resized to 0 bytes, whoever still references them) before the next is packed, so the
gather costs about N x max(bucket_bytes, largest parameter) extra bytes for a moment, never a copy
of the model, and nothing once ``all_gather_`` returns.
Bytes sent: (N - 1) x slot size per bucket, as ``CommStats`` counts an all-gather. Each slot is
padded to its bucket's largest run: little when bucket_bytes is well above the parameters' sizes
(every rank's runs then fill to near the cap), more when single parameters of unequal sizes share
buckets (+46% at 4 KiB on a 2-layer width-64 GPT; nothing with one bucket).

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
Exact for the FP8 GEMM: ``Fp8Linear``'s forward (``current`` recipe, margin 0) re-quantizes a decoded
weight; its amax is max|code| * scale_inv, so its scale is the owner's times 2**k, k >= 0, and
code * 2**k is again an E4M3 value: the GEMM sees code * scale_inv, no second rounding (a margin or
a delayed / constant scale below the owner's may round the smallest codes again, on every rank
alike). Any other reader of such a parameter sees the E4M3 rounding, not the master.
Decoding (``decode_fp8_into``): code * scale_inv in fp32, exact (a power of two), rounded once to the
parameter's dtype: exact in fp32 always (scale_inv >= 2**-126 keeps code bits above 2**-149), in
bf16 unless the amax is below ~2**-116; see comm/zero/optimizer.py for fp16 parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from fp8train._decode_cpu import decode_fp8_into
from fp8train.cast import cast_to_fp8
from fp8train.formats import E4M3
from fp8train.optim import Fp8AdamW
from fp8train.scaling import amax_to_log2_scale, tensor_to_amax
from fp8train.tensor import Fp8Tensor

__all__ = [
    "AllGather",
    "Fp8WeightLayer",
    "WeightBuckets",
    "WeightGather",
    "encode_fp8_weights_",
    "inner_master_problem",
    "plan_weight_buckets",
    "plan_weight_slots",
    "slot_nbytes",
]

# every parameter starts at a multiple of this many bytes in a weight slot, so that the uint8 buffer
# can be viewed as any dtype at that offset
SLOT_ALIGN_BYTES = 16
# an FP8 parameter's fp32 scale_inv, in front of its codes (at an aligned offset: viewable as fp32)
SCALE_INV_BYTES = 4


def slot_nbytes(p: torch.Tensor, fp8: bool, scale_inv_bytes: int = SCALE_INV_BYTES) -> int:
    """Bytes parameter ``p`` puts in its owner's slot, before alignment (``scale_inv_bytes``: its
    scales', an FP8 primary weight's per-block ones)."""
    return scale_inv_bytes + p.numel() if fp8 else p.numel() * p.element_size()


def _aligned(nbytes: int) -> int:
    return -(-nbytes // SLOT_ALIGN_BYTES) * SLOT_ALIGN_BYTES


@dataclass(frozen=True, slots=True)
class WeightBuckets:
    """The gather plan. bucket_of[i] / offsets[i]: parameter i's bucket and its byte offset in its
    owner's slot there; slot_bytes[b]: bucket b's slot size (its largest rank's bytes);
    members[b]: bucket b's parameters, in the planning order."""

    bucket_of: tuple[int, ...]
    offsets: tuple[int, ...]
    slot_bytes: tuple[int, ...]
    members: tuple[tuple[int, ...], ...]


def plan_weight_buckets(nbytes: Sequence[int], owner: Sequence[int], order: Sequence[int], world_size: int,
                        bucket_bytes: int | None) -> WeightBuckets:
    """Parameters placed in ``order`` (every index once; the same on every rank), each rank's cut
    into consecutive runs of at most ``bucket_bytes`` aligned bytes (a larger parameter: a run of
    its own; None: no cap, one bucket); bucket b = every rank's b-th run. Pure: no communication."""
    bucket_of, offsets = [0] * len(nbytes), [0] * len(nbytes)
    run, used = [0] * world_size, [0] * world_size
    for i in order:
        r, size = owner[i], _aligned(nbytes[i])
        if bucket_bytes is not None and used[r] > 0 and used[r] + size > bucket_bytes:
            run[r], used[r] = run[r] + 1, 0
        bucket_of[i], offsets[i] = run[r], used[r]
        used[r] += size
    slot_bytes = [0] * (max(bucket_of[i] for i in order) + 1 if order else 0)
    members: list[list[int]] = [[] for _ in slot_bytes]
    for i in order:
        slot_bytes[bucket_of[i]] = max(slot_bytes[bucket_of[i]], offsets[i] + _aligned(nbytes[i]))
        members[bucket_of[i]].append(i)
    return WeightBuckets(bucket_of=tuple(bucket_of), offsets=tuple(offsets), slot_bytes=tuple(slot_bytes),
                         members=tuple(tuple(m) for m in members))


def plan_weight_slots(nbytes: Sequence[int], owner: Sequence[int], order: Sequence[int],
                      world_size: int) -> tuple[list[int], int]:
    """The single-bucket plan: each parameter's byte offset inside its owner's slot, and the slot
    size (the largest rank's bytes)."""
    plan = plan_weight_buckets(nbytes, owner, order, world_size, bucket_bytes=None)
    return list(plan.offsets), plan.slot_bytes[0] if plan.slot_bytes else 0


def inner_master_problem(optimizer: torch.optim.Optimizer, fp8_primary: Sequence[torch.Tensor] = ()) -> str | None:
    """None if ``optimizer`` keeps its own master weight (and writes the FP8 primary weights
    ``fp8_primary`` it owns, through ``Fp8AdamW(fp8_weights=...)``), else what it is instead.

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
    written = {id(p) for p in optimizer.fp8_weight_params}
    if any(id(p) not in written for p in fp8_primary):
        return "Fp8AdamW without fp8_weights for the FP8 primary weights it owns"
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


# the collective of one bucket: all_gather(output, input, group), output = N x input bytes, rank r's
# input at [r * len(input), (r + 1) * len(input)). Injectable so that a test can count and measure calls.
AllGather = Callable[[torch.Tensor, torch.Tensor, "dist.ProcessGroup | None"], object]


def _all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    # all_gather_single is the newer name (torch >= 2.12); all_gather_into_tensor before it
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


class Fp8WeightLayer(Protocol):
    """A layer that stores its weight in FP8 (``fp8train.Fp8Linear(fp8_weight=True)``): the owner's
    optimizer writes its codes; the gather reads them there and writes them into every other rank's."""

    def stored_fp8_weight(self) -> Fp8Tensor: ...

    def set_fp8_weight_(self, codes: torch.Tensor, scale_inv: torch.Tensor) -> None: ...

    def release_high_precision_(self) -> None: ...


class WeightGather:
    """The weight all-gather of one ``ZeroOptimizer`` (see the module docstring).

    params / owner: every parameter and its owner rank; order: the slot order, (owner, index);
    fp8[i]: parameter i travels as E4M3; bucket_bytes: the cap on each rank's slot in a bucket
    (None: one bucket); all_gather: the collective (tests inject a counting one). ``log2_scales``:
    {index: 0-d fp32 scaling bias} of the FP8 parameters this rank owns, the scale kept when the
    amax is 0, inf or nan. ``plan``: the ``WeightBuckets`` (not checkpointed: rebuilt from the
    parameters, which is why a checkpoint loads under any bucket_bytes).
    layers: {index: Fp8WeightLayer} of FP8 primary weights (fp8[i] must be True): their codes and
    scale_inv travel as they are, from the owner's layer into the others' (no encoding, no decoding)."""

    def __init__(self, params: Sequence[torch.Tensor], owner: Sequence[int], order: Sequence[int],
                 fp8: Sequence[bool], *, rank: int, world_size: int, group: dist.ProcessGroup | None,
                 bucket_bytes: int | None, all_gather: AllGather = _all_gather_into_tensor,
                 layers: Mapping[int, Fp8WeightLayer] | None = None) -> None:
        self.params, self.owner, self.fp8 = list(params), list(owner), list(fp8)
        self.layers = dict(layers or {})
        if any(not self.fp8[i] for i in self.layers):
            raise ValueError("WeightGather: a layer with an FP8 weight must be marked fp8")
        for i, layer in self.layers.items():
            if self.owner[i] != rank:  # only the owner's optimizer needs the value, for its master
                layer.release_high_precision_()
        self.rank, self.world_size, self.group = rank, world_size, group
        self._all_gather = all_gather
        # the scale_inv each FP8 parameter carries: 0-d fp32, or an FP8 primary weight's (its blocks')
        self._scale_like = {i: torch.empty((), dtype=torch.float32) for i in range(len(self.params)) if self.fp8[i]}
        self._scale_like.update({i: layer.stored_fp8_weight().scale_inv for i, layer in self.layers.items()})
        nbytes = [slot_nbytes(p, f, self._scale_like[i].nbytes if f else 0)
                  for i, (p, f) in enumerate(zip(self.params, self.fp8))]
        self.plan = plan_weight_buckets(nbytes, self.owner, order, world_size, bucket_bytes)
        device = self.params[0].device
        self.log2_scales = {i: torch.zeros((), dtype=torch.float32, device=device)
                            for i in order if self.owner[i] == rank and self.fp8[i] and i not in self.layers}

    def _raw(self, slot: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        start = self.plan.offsets[i]
        return slot[start:start + p.numel() * p.element_size()].view(p.dtype).view(p.shape)

    def _scale_inv(self, slot: torch.Tensor, i: int) -> torch.Tensor:
        like, start = self._scale_like[i], self.plan.offsets[i]  # 16-aligned: viewable as fp32
        return slot[start:start + like.nbytes].view(like.dtype).view(like.shape)

    def _codes(self, slot: torch.Tensor, i: int) -> torch.Tensor:
        start = self.plan.offsets[i] + self._scale_like[i].nbytes
        return slot[start:start + self.params[i].numel()]

    @torch.no_grad()
    def all_gather_(self) -> int:
        """Every bucket in turn; returns the bytes this rank sent, counted as ``CommStats`` counts an
        all-gather (the chunks of the other N - 1 ranks), summed over the buckets."""
        return sum(self._gather_bucket(b) for b in range(len(self.plan.slot_bytes)))

    def _gather_bucket(self, b: int) -> int:
        """Pack this rank's parameters of bucket ``b``, all-gather, unpack everyone's. The slot and
        the gather buffer are locals: they are freed on return, before the next bucket is packed."""
        slot_bytes, members = self.plan.slot_bytes[b], self.plan.members[b]
        if slot_bytes == 0:  # only empty lossless parameters: nothing to move
            return 0
        device = self.params[0].device
        owned = [i for i in members if self.owner[i] == self.rank]
        mine = torch.zeros(slot_bytes, dtype=torch.uint8, device=device)
        for i in owned:
            if not self.fp8[i]:
                self._raw(mine, i).copy_(self.params[i])
            elif i in self.layers:  # FP8 primary weight: the codes the owner's optimizer wrote
                stored = self.layers[i].stored_fp8_weight()
                self._codes(mine, i).copy_(stored.data.reshape(-1).view(torch.uint8))
                self._scale_inv(mine, i).copy_(stored.scale_inv)
        fp8_owned = [i for i in owned if self.fp8[i] and i not in self.layers]
        encode_fp8_weights_([self.params[i] for i in fp8_owned], [self.log2_scales[i] for i in fp8_owned],
                            [self._codes(mine, i).view(E4M3.dtype).view(self.params[i].shape) for i in fp8_owned],
                            [self._scale_inv(mine, i) for i in fp8_owned])
        gathered = torch.empty(self.world_size * slot_bytes, dtype=torch.uint8, device=device)
        self._all_gather(gathered, mine, self.group)
        slots = gathered.split(slot_bytes)
        for i in members:
            p, slot = self.params[i], slots[self.owner[i]]
            if not self.fp8[i]:
                if self.owner[i] != self.rank:
                    p.copy_(self._raw(slot, i))
                continue
            if i in self.layers:
                if self.owner[i] != self.rank:
                    self.layers[i].set_fp8_weight_(self._codes(slot, i).view(E4M3.dtype), self._scale_inv(slot, i))
                continue
            # FP8: the owner too, it must hold the decoded value like everyone else
            out = p.view(-1) if p.is_contiguous() else torch.empty(p.numel(), dtype=p.dtype, device=device)
            decode_fp8_into(self._codes(slot, i), E4M3, self._scale_inv(slot, i), out)
            if not p.is_contiguous():
                p.copy_(out.view(p.shape))
        # free the buffers' memory now, not when the last reference goes: the backend may still hold
        # the finished collective's tensors for a while (a gloo worker thread did, after step():
        # bench/memory.py once counted N x slot bytes more). Nothing reads them after this point.
        for buffer in (mine, gathered):
            buffer.untyped_storage().resize_(0)
        return (self.world_size - 1) * slot_bytes
