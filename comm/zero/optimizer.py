"""Whole-tensor ZeRO-1/2 (docs/design.md): every parameter, with its optimizer state, lives on exactly
one owner rank (``partition_parameters``: deterministic LPT, no communication); owners step an
ordinary inner optimizer over their own parameters, then every rank receives the new weights.

One ``ZeroOptimizer.step()`` on N ranks:
  stage 1: ``fp8_all_reduce_`` of every gradient (replicated on all ranks);
  stage 2: buckets sorted by owner, ``fp8_reduce_scatter(requantize=True)`` with owner-aligned bounds:
           owners get bit for bit the all-reduce's mean; non-owned gradients are freed (``.grad = None``).
           With ``overlap_grad_reduce`` a bucket goes as soon as the backward inside ``last_micro_step()``
           has accumulated it (comm/zero/_grad_reduce.py): the backward holds the owned gradients and
           about two buckets; ``step()`` sends what is left (everything without the flag).
  overflow: the comm's ``found_inf`` is the same on every rank (it comes from the MAX-reduced amax),
           so every rank skips the rest of the step identically: no clipping, no optimizer step,
           weights and state untouched, ``skipped_steps`` += 1.
  clipping (``max_grad_norm``): comm/zero/_clip.py. A non-finite global norm (the same on every rank)
           skips the step like an overflow, as DdpStrategy does. Without ``max_grad_norm`` no norm
           is computed: see the Limitation below.
  owners step the inner optimizer, then all-gathers in buckets move the new weights
           (comm/zero/_weights.py): in bucket b, rank r's slot holds its b-th run of owned
           parameters (at most ``comm.bucket_bytes``), each 16-byte aligned, padded to the bucket's
           largest slot; a parameter travels as its own dtype's bytes (uint8 view: lossless) or, if
           named in ``fp8_weight_names``, as E4M3 codes plus its fp32 scale_inv. Every rank takes
           the others' parameters out of it (and decodes its own FP8 ones), so the weights are
           bit-identical on all ranks after every step (bytes: ``ZeroStepResult.weight_bytes_sent``).

Because the gradients an owner sees are bit-identical to the replicated path's, and the inner
optimizer's math is per tensor (``Fp8AdamW``), ZeRO-1/2 reproduce the replicated FP8 path bit for bit
(with ``fp8_weight_names``: followed by the E4M3 round trip of those parameters after each step).

FP8 weights travel as E4M3 codes plus their fp32 scale_inv (numel + 4 bytes instead of numel *
element_size): FP8 primary weights (``fp8_weight_layers``, the trainer's ``precision.fp8_weights``)
as the owner's ``Fp8AdamW`` wrote them into its layer, copied into every other rank's layer; or
(``fp8_weight_names``) a high-precision parameter the owner encodes (margin-0 power-of-two scale from
its amax) and every rank decodes, exact for the forward's ``current`` re-cast. Both need an inner
optimizer with its own master weight (``Fp8AdamW``, master_dtype not None; checked on every rank).
The numerics of each: comm/zero/_weights.py and ``inner_master_problem``.

Weights and gradients are bucketed by one knob, ``Fp8CommConfig.bucket_bytes`` (for the weights:
each rank's slot per all-gather; temporaries ~N x max(bucket_bytes, largest parameter), freed
bucket by bucket; the same result as one whole-model bucket, a little more padding on the wire).

Limitation (no clipping only): ``Fp8AdamW`` skips a step on its own when a new m, v or weight is
non-finite, which finite gradients reach only at |g| > ~1.8e19 (g**2 overflows fp32). With clipping
the norm is then inf and every rank skips; without it the step is partial (other owners stepped),
where DdpStrategy skips (a per-step norm collective is not worth it); weights stay all-gathered.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from fp8train._validate import check_choice, check_type
from fp8train.comm._agree import failed_ranks, run_collectively
from fp8train.comm.allreduce import fp8_all_reduce_
from fp8train.comm.config import Fp8CommConfig
from fp8train.comm.stats import CommStats
from fp8train.comm.zero._clip import clip_owned_grads_
from fp8train.comm.zero._grad_reduce import GradReduceScatter
from fp8train.comm.zero._named_state import load_named_state, named_state, optimizer_formats
from fp8train.comm.zero._weights import Fp8WeightLayer, WeightGather, inner_master_problem
from fp8train.comm.zero.partition import Partition, partition_parameters
from fp8train.optim import Fp8AdamW

__all__ = [
    "FP8_ADAMW_STATE_BYTES_PER_ELEMENT",
    "FP8_ADAMW_STATE_BYTES_PER_TENSOR",
    "ZeroConfig",
    "ZeroOptimizer",
    "ZeroStepResult",
    "predicted_state_nbytes",
]

_OWNER = "ZeroConfig"

# Fp8AdamW with its default formats: m e4m3 (1 byte) + v fp16 (2) + master fp16 (2) per element,
# and per parameter four 0-d fp32 tensors (step, the log2 scales of m, v and the master), its 0-d
# int64 rounding key and its (7,) fp32 bound record (optim/_bounds.py): 16 + 8 + 28 bytes.
FP8_ADAMW_STATE_BYTES_PER_ELEMENT = 5
FP8_ADAMW_STATE_BYTES_PER_TENSOR = 52


@dataclass(kw_only=True, slots=True)
class ZeroConfig:
    """stage:         1 (optimizer state sharded; gradients all-reduced, replicated) or 2 (also
                      gradients: reduce-scattered to their owners, freed elsewhere).
    comm:             how gradients travel in FP8 (``Fp8CommConfig``: format, bucket_bytes, which
                      also caps each rank's slot in a weight all-gather bucket, ...).
    max_grad_norm:    clip gradients so that their global L2 norm (over all parameters, in
                      gradient units, accumulated in fp32) is at most this; a non-finite norm
                      skips the step. None: no clipping, and no norm computed.
    overlap_grad_reduce: stage 2: reduce-scatter each gradient bucket from the last micro-step's
                      backward (``ZeroOptimizer.last_micro_step``), freeing non-owned gradients as
                      it goes; False: all in ``step()``. The same bits either way. Stage 1 ignores it.
    """

    stage: int = 2
    comm: Fp8CommConfig = field(default_factory=Fp8CommConfig)
    max_grad_norm: float | None = None
    overlap_grad_reduce: bool = True

    def __post_init__(self) -> None:
        check_type(_OWNER, "stage", self.stage, int)
        check_choice(_OWNER, "stage", self.stage, (1, 2))
        if not isinstance(self.comm, Fp8CommConfig):
            raise ValueError(f"{_OWNER}.comm={self.comm!r} has type {type(self.comm).__name__}; "
                             "expected Fp8CommConfig")
        if self.max_grad_norm is not None:
            check_type(_OWNER, "max_grad_norm", self.max_grad_norm, (int, float))
            if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
                raise ValueError(f"{_OWNER}.max_grad_norm={self.max_grad_norm!r} is out of range; "
                                 "allowed: None or a finite number > 0")
        check_type(_OWNER, "overlap_grad_reduce", self.overlap_grad_reduce, bool)


@dataclass(kw_only=True, slots=True)
class ZeroStepResult:
    """skipped: the step was skipped (identically on every rank): overflow in the comm, or a
               non-finite clipping norm.
    grad_norm: global L2 norm of the synchronised gradients before clipping (0-d fp32, identical on
               every rank; inf or nan when that skipped the step); None when not clipping or
               skipped for overflow in the comm.
    comm: this rank's gradient communication statistics (merged over buckets).
    weight_bytes_sent: bytes sent in the weight all-gathers: (N - 1) x slot, summed over buckets; 0 if skipped."""

    skipped: bool
    grad_norm: torch.Tensor | None
    comm: CommStats
    weight_bytes_sent: int = 0


def predicted_state_nbytes(numels: Sequence[int], partition: Partition, *,
                           bytes_per_element: int = FP8_ADAMW_STATE_BYTES_PER_ELEMENT,
                           bytes_per_tensor: int = FP8_ADAMW_STATE_BYTES_PER_TENSOR) -> list[int]:
    """Optimizer state bytes on each rank once every owned parameter has taken a step: per owned
    element ``bytes_per_element`` plus ``bytes_per_tensor`` per owned non-empty tensor (empty tensors
    get no state). Defaults: ``Fp8AdamW`` with its default formats."""
    out = [0] * partition.world_size
    for n, r in zip(numels, partition.owner):
        if n > 0:
            out[r] += n * bytes_per_element + bytes_per_tensor
    return out


class ZeroOptimizer:
    """Whole-tensor ZeRO-1/2 around any optimizer (see the module docstring).

    named_params:      (name, parameter) pairs, e.g. ``model.named_parameters()`` (which lists a tied
                       weight once); every parameter must receive a gradient on every rank each step.
                       The order is the partition's order; all ranks must pass the same list.
    optimizer_factory: builds the inner optimizer from this rank's owned parameters (ascending in the
                       given order); called only on ranks that own at least one parameter.
    group:             process group (None: the default group).
    fp8_weight_names:  names (from named_params) of parameters whose new value travels as E4M3 +
                       scale_inv and is replaced on every rank by that rounding (module docstring);
                       e.g. the ``.weight`` of every ``Fp8Linear``. Needs an inner optimizer with a
                       master weight (``Fp8AdamW``, master_dtype not None). Empty: all lossless.
    fp8_weight_layers: {name: layer} of FP8 primary weights (``Fp8Linear(fp8_weight=True)``): their
                       codes travel as the owner's optimizer wrote them into the layer (``Fp8AdamW``
                       with ``fp8_weights``), into every other rank's layer; non-owners release them.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]],
                 optimizer_factory: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], *,
                 config: ZeroConfig, group: dist.ProcessGroup | None = None,
                 fp8_weight_names: Iterable[str] = (),
                 fp8_weight_layers: Mapping[str, Fp8WeightLayer] | None = None) -> None:
        if not isinstance(config, ZeroConfig):
            raise ValueError(f"ZeroOptimizer.config={config!r} has type {type(config).__name__}; expected ZeroConfig")
        named = list(named_params)
        if not named:
            raise ValueError("ZeroOptimizer: named_params is empty")
        seen: dict[int, str] = {}
        for name, p in named:
            if id(p) in seen:
                raise ValueError(f"ZeroOptimizer: parameter {name!r} is the same tensor as {seen[id(p)]!r}; "
                                 "pass each parameter once (model.named_parameters() dedups tied weights)")
            seen[id(p)] = name
            if p.device != named[0][1].device:
                raise ValueError(f"ZeroOptimizer: parameter {name!r} is on {p.device}, {named[0][0]!r} on "
                                 f"{named[0][1].device}; all parameters must share one device")
        if isinstance(fp8_weight_names, str):
            raise ValueError(f"ZeroOptimizer.fp8_weight_names={fp8_weight_names!r} is one string; "
                             "expected an iterable of parameter names")
        layers = dict(fp8_weight_layers or {})
        fp8_names = set(fp8_weight_names) | set(layers)
        unknown = sorted(fp8_names - {n for n, _ in named})
        if unknown:
            raise ValueError(f"ZeroOptimizer.fp8_weight_names: {unknown[0]!r} is not the name of a parameter "
                             "in named_params")
        self.config = config
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.partition = partition_parameters([p.numel() for p in self.params], self.world_size)
        self._owned = self.partition.owned_by(self.rank)
        owned = [self.params[i] for i in self._owned]
        # a factory that fails on one rank (out of memory, a bad setting) raises on every rank
        self.optimizer = run_collectively("ZeroOptimizer.optimizer_factory",
                                          lambda: optimizer_factory(owned) if owned else None,
                                          device=self.params[0].device, group=group)
        # stage 2: every owner's tensors contiguous, so that owner-aligned reduce-scatter bounds exist
        self._by_owner = sorted(range(len(self.params)), key=lambda i: (self.partition.owner[i], i))
        self.fp8_weight_names = tuple(n for n in self.names if n in fp8_names)  # in named_params order
        self._weights = WeightGather(self.params, self.partition.owner, self._by_owner,
                                     [n in fp8_names for n in self.names],
                                     rank=self.rank, world_size=self.world_size, group=group,
                                     bucket_bytes=config.comm.bucket_bytes,
                                     layers={i: layers[n] for i, n in enumerate(self.names) if n in layers})
        if fp8_names:
            self._check_inner_master()
        self._grads = GradReduceScatter(self.names, self.params, self.partition.owner, rank=self.rank,
                                        world_size=self.world_size, group=group, config=config.comm,
                                        in_backward=config.stage == 2 and config.overlap_grad_reduce)
        self._skipped_steps = 0
        self._calls = 0
        self.last_step_skipped = False
        self.last_grad_norm: torch.Tensor | None = None

    # ---- introspection ---------------------------------------------------------------------------

    @property
    def owned_parameter_names(self) -> list[str]:
        return [self.names[i] for i in self._owned]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped (overflow, non-finite clipping norm) since construction (the same on all ranks)."""
        return self._skipped_steps

    def state_nbytes(self) -> int:
        """Bytes of optimizer state held on this rank (0 on a rank that owns nothing)."""
        if self.optimizer is None:
            return 0
        if hasattr(self.optimizer, "state_nbytes"):
            return int(self.optimizer.state_nbytes())
        return sum(v.nbytes for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v))

    def predicted_state_nbytes(self, **kwargs: int) -> list[int]:
        """Per-rank state bytes predicted from the partition (``predicted_state_nbytes``' keywords)."""
        return predicted_state_nbytes([p.numel() for p in self.params], self.partition, **kwargs)

    # ---- checkpoints (by parameter name; files: fp8train.comm.zero.checkpoint) -------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's share, keyed by parameter NAME (rank-order free, see comm/zero/_named_state.py):
        {"param_state": {name: {"state": inner state tensors as held, "group": hyperparameters}}
         for every owned parameter (state {} before its first step), "extra": the inner
         state_dict's other keys, "formats": {"optimizer": class, "state_formats": ...},
         "skipped_steps", "step_calls", "world_size"}. Tensors alias the live state.
        An owned FP8 weight's entry also holds "weight_log2_scale" (0-d fp32): the scaling bias its
        all-gather keeps when the amax is 0/inf/nan. Inside the per-name entry, it travels with the
        parameter's state when a checkpoint is loaded on another world size."""
        param_state: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        if self.optimizer is not None:
            param_state, extra = named_state(self.optimizer, {id(p): n for n, p in zip(self.names, self.params)})
        for i, log2_scale in self._weights.log2_scales.items():
            param_state.setdefault(self.names[i], {})["weight_log2_scale"] = log2_scale
        return {"param_state": param_state, "extra": extra, "formats": optimizer_formats(self.optimizer),
                "skipped_steps": self._skipped_steps, "step_calls": self._calls, "world_size": self.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the entries this rank owns NOW from ``state_dict["param_state"]``, which may hold any
        set of names (one rank's ``state_dict()`` or several merged, saved at any world size).
        ValueError names an owned parameter that has no entry, or a format mismatch. An owned FP8
        weight whose entry has no "weight_log2_scale" (saved without ``fp8_weight_names``) keeps its
        current bias: it is only the fallback for an amax of 0/inf/nan, the next step sets a fresh one."""
        where = "ZeroOptimizer.load_state_dict"
        saved, mine = state_dict.get("formats", {}), optimizer_formats(self.optimizer)
        if self.optimizer is not None and saved.get("optimizer") is not None:
            for key in ("optimizer", "state_formats"):
                if saved.get(key) != mine[key]:
                    raise ValueError(f"{where}: saved {key} {saved.get(key)!r} differs from this rank's {mine[key]!r}")
        if self.optimizer is not None:
            load_named_state(self.optimizer, {id(p): n for n, p in zip(self.names, self.params)},
                             state_dict["param_state"], state_dict.get("extra", {}), where)
        for i, log2_scale in self._weights.log2_scales.items():
            saved_log2 = state_dict["param_state"].get(self.names[i], {}).get("weight_log2_scale")
            if saved_log2 is not None:
                log2_scale.copy_(saved_log2.reshape(()))
        self._skipped_steps = int(state_dict["skipped_steps"])
        self._calls = int(state_dict["step_calls"])

    # ---- the step --------------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grads.reset()
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @contextmanager
    def last_micro_step(self) -> Iterator[None]:
        """Context of the last micro-step's forward + backward (the one before ``step()``): with stage 2
        and ``overlap_grad_reduce``, each gradient bucket is reduce-scattered as soon as this backward
        has accumulated it, and the non-owned gradients are freed (comm/zero/_grad_reduce.py); ``step()``
        sends what is left. One backward inside; every rank must use it alike. Otherwise a no-op."""
        self._grads.arm(self._quant_stats_now())
        try:
            yield
        finally:
            self._grads.disarm()

    def _quant_stats_now(self) -> bool:  # this step's comm counts saturated / underflowed elements
        every = self.config.comm.stats_every
        return every > 0 and self._calls % every == 0

    @torch.no_grad()
    def step(self) -> ZeroStepResult:
        """Synchronise gradients, skip on overflow, clip, step the owners, gather the weights.

        Afterwards only the owned parameters' ``.grad`` are meaningful: stage 2 has freed the others
        (also on a skipped step), and stage 1 clips only the owned ones (the others are not used).

        A parameter without a gradient on some rank raises RuntimeError on EVERY rank (naming the
        parameter there, the failing rank elsewhere) at no cost to a good step: it travels as NaN, so
        every rank takes the found_inf path, where one all_reduce tells it from an overflow."""
        quant_stats = self._quant_stats_now()
        self._calls += 1
        if self.config.stage == 1:
            grads, missing = self._gradients()
            comm = fp8_all_reduce_(grads, config=self.config.comm, group=self.group, quant_stats=quant_stats)
            comm.tensor_names = tuple(n for n, g in zip(self.names, grads) if g.numel() > 0)  # plan_buckets' order
        else:  # stage 2: the buckets the backward has not sent (comm/zero/_grad_reduce.py)
            comm, missing = self._grads.finish(quant_stats)
        self.last_grad_norm = None
        if comm.found_inf:  # agreed on every rank: all of them come here
            if ranks := failed_ranks(bool(missing), device=self.params[0].device, group=self.group):
                if missing:
                    raise RuntimeError(f"ZeroOptimizer.step: parameter {missing[0]!r} has no gradient; every "
                                       "parameter must receive one on every rank (pass only trained parameters)")
                raise RuntimeError(f"ZeroOptimizer.step: parameter(s) without a gradient on rank(s) {ranks}")
            return self._skip(comm)
        if self.config.max_grad_norm is not None:
            self.last_grad_norm = clip_owned_grads_(self.params, self._owned, self.config.max_grad_norm,
                                                    self.group, self.optimizer)
            if not bool(torch.isfinite(self.last_grad_norm)):  # the same norm, so the same verdict, everywhere
                return self._skip(comm)
        self.last_step_skipped = False
        if self.optimizer is not None:
            self.optimizer.step(**self._inner_step_kwargs(comm))
        weight_bytes = self._weights.all_gather_()
        return ZeroStepResult(skipped=False, grad_norm=self.last_grad_norm, comm=comm, weight_bytes_sent=weight_bytes)

    def _inner_step_kwargs(self, comm: CommStats) -> dict[str, Any]:
        """``Fp8AdamW``: the sync's upper bounds of the owned gradients' amax (``CommStats.grad_amax``), so that
        its step reads each gradient once; a clip's exact amaxes (``clip_owned_grads_``) take precedence."""
        if not isinstance(self.optimizer, Fp8AdamW):
            return {}
        bound = comm.grad_amax_by_name()
        return {"grad_amax": {self.params[i]: bound[self.names[i]] for i in self._owned if self.names[i] in bound}}

    def _gradients(self) -> tuple[list[torch.Tensor], list[str]]:
        """Stage 1: each parameter's gradient, a NaN stand-in for a missing one (see ``step``), and the names
        of the missing ones. An empty parameter has nothing to synchronise: a missing gradient of one
        becomes an empty zero gradient."""
        grads, missing = [], []
        for name, p in zip(self.names, self.params):
            if p.grad is None and p.numel() == 0:
                p.grad = torch.zeros_like(p)
            if p.grad is None:
                missing.append(name)
                grads.append(torch.full_like(p, float("nan")))
            else:
                grads.append(p.grad)
        return grads, missing

    def _skip(self, comm: CommStats) -> ZeroStepResult:
        """Weights and optimizer state untouched, identically on every rank."""
        self.last_step_skipped = True
        self._skipped_steps += 1
        return ZeroStepResult(skipped=True, grad_norm=self.last_grad_norm, comm=comm)

    # ---- weights (the all-gather itself: comm/zero/_weights.py) ---------------------------------------

    def _check_inner_master(self) -> None:
        """FP8 weights need an inner optimizer with its own master (see ``inner_master_problem``).
        Checked where it matters, on the owners of FP8 parameters, then agreed with one all_reduce,
        so that every rank raises (none is left waiting in a later collective)."""
        problem = None
        if self.optimizer is not None and any(self._weights.fp8[i] for i in self._owned):
            problem = inner_master_problem(self.optimizer, [self.params[i] for i in self._owned
                                                            if i in self._weights.layers])
        if ranks := failed_ranks(problem is not None, device=self.params[0].device, group=self.group):
            got = problem or f"not so on rank(s) {ranks}"
            raise ValueError("ZeroOptimizer.fp8_weight_names needs an inner optimizer that keeps its own master "
                             f"weight (Fp8AdamW with master_dtype 'fp16', 'bf16' or 'fp32'); got {got}")
