"""``Fp8AdamW``: AdamW whose moments and master weight are stored in low precision with per-tensor
power-of-two scales (precision-decoupled: each state gets the precision it needs).

State per parameter (default dtypes; every one is configurable):
    exp_avg_scaled     m, float8_e4m3fn  + exp_avg_log2_scale       1 byte / element
    exp_avg_sq_scaled  v, float16        + exp_avg_sq_log2_scale    2 bytes
    master_scaled      w, float16        + master_log2_scale        2 bytes (absent with master_dtype=None)
    step               number of steps taken (0-d fp32)
    rounding_key       0-d int64: its stochastic-rounding key (from ``seed`` and its name or position)
    bound_record       (7,) fp32: what the next step's amax bounds need (``_bounds.RECORD``)
Stored value = x * 2**log2_scale. The keys differ from torch AdamW's "exp_avg" / "exp_avg_sq" on
purpose (``_eager.STORED_KEYS``): neither optimizer can take the other's state for its own.
A step decodes the states to fp32 (exact: power-of-two scales), computes the AdamW update in fp32
(``_eager.py`` gives the formula), and re-encodes m, v and the master, reading and writing each
tensor once: the scales come from upper bounds of the new amaxes known before the pass (``_bounds``:
from amax(g) and the previous step's record; ``fp8train.scaling.amax_to_log2_scale`` maps the bound
just under the format's max, a bound 0 keeps the previous scale), so they are the fresh amax scales
or, where a bound crosses a power of two, one binade coarser. The parameter then receives the
master's new value (decoded, rounded to its dtype), or the new weight itself when it is its own
master. Numerical consequences (tested against torch.optim.AdamW):
  - fp32 states: the same trajectory as torch.optim.AdamW up to fp32 rounding.
  - e4m3 m: relative error <= 2**-4 (round to nearest even); elements below amax * 2**-17 flush to 0.
  - fp16 master: 11 significant bits; an update below half an ulp of the weight (2**-11 |w|) is lost.
  - rounding="stochastic" removes those losses on average (``_rounding``): E[stored] = value, so under
    steady gradients the weights move like AdamW's instead of 20-30 % short (tests/test_optim_sr.py).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from fp8train.optim._bounds import initial_record
from fp8train.optim._bucket import (
    RECORD_KEY,
    Bucket,
    amax_bounds,
    coef_matrix,
    compiled_default,
    fused_eligible,
    given_amax,
    weight_amax_needed,
)
from fp8train.optim._clip import PendingClip, clip_coefficient
from fp8train.optim._eager import SLOT_NAMES, STORED_KEYS
from fp8train.optim._formats import (
    EXP_AVG_FORMATS,
    EXP_AVG_SQ_FORMATS,
    MASTER_FORMATS,
    PARAM_DTYPES,
    StateFormat,
    decode,
    encode_,
    resolve_format,
)
from fp8train.optim._fp8_weights import (
    Fp8WeightSink,
    checked_fp8_weights,
    initial_weight,
    weight_output,
    write_fp8_weights_,
)
from fp8train.optim._kernel import load_kernel
from fp8train.optim._rounding import parameter_key, stream_keys
from fp8train.optim._sharded import like_param, local, shard_group, sync_max_, sync_sum_
from fp8train.optim._state_dict import ROUNDING_KEY as _KEY
from fp8train.optim._state_dict import loaded_state
from fp8train.optim.config import check_hyperparameters, check_rounding
from fp8train.scaling import amax_to_log2_scale, tensor_to_amax

__all__ = ["Fp8AdamW"]

_OWNER = "Fp8AdamW"


class Fp8AdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` semantics (decoupled weight decay, bias correction, param groups with
    their own lr / betas / eps / weight_decay / maximize, lr schedulers) with low-precision state.

    lr, betas, eps, weight_decay: as torch's AdamW, checked (here, per param group and on load) by
                      ``check_hyperparameters``, the project's one rule: lr and weight_decay finite
                      >= 0, eps finite > 0, betas in [0, 1).
    exp_avg_dtype:    m storage: torch.float8_e4m3fn (default), bfloat16, float16, float32
                      (or the names "e4m3", "bf16", "fp16", "fp32").
    exp_avg_sq_dtype: v storage: float16 (default), bfloat16, float32.
    master_dtype:     master weight storage: float16 (default, scaled), bfloat16, float32, or None
                      (the parameter is the master: updated in its own dtype).
    maximize:         maximize the objective. amsgrad is not supported (ValueError).
    fused:            None (default): CPU tensors go through the fused C kernel when it can be built
                      here, everything else through torch._foreach ops (identical results);
                      True: require the kernel; False: never use it.
    fp8_weights:      {parameter: layer} of FP8 primary weights (``fp8train.Fp8Linear(fp8_weight=True)``,
                      needs a master): the master starts from the parameter, whose values the layer
                      then releases; after each step the layer casts the new weight to E4M3, which
                      the step writes into the parameter's gradient buffer, then frees (grad None)
                      (optim/_fp8_weights.py).
    compiled:         the foreach path as a torch.compile'd graph per bucket (one launch-light step
                      instead of ~20 foreach launches per op): None (default) on accelerators
                      (CUDA), not on CPU; True / False: always / never. Bit-identical on CPU.
    rounding:         how m, v and the master (or a bf16/fp16 parameter that is its own master) are
                      re-encoded: "nearest" (round to nearest even) or "stochastic" (unbiased: E[stored]
                      = value, so EMA increments and updates below half an ulp are not lost on
                      average; ``_rounding`` gives the rule and the counter-based random bits).
    seed:             int in [0, 2**32): with the parameter's name (param groups with ``param_names``)
                      or position, the step and the element index, sets every random bit (no RNG
                      state; the key is kept in the state: a resumed run continues bit-exactly).

    Overflow: a step whose gradients make any new m, v or weight non-finite is skipped as a whole
    (every group, every parameter: states, scales, step counts and parameters stay bit-identical),
    and counted in ``skipped_steps``. A caller that knows of an overflow the optimizer cannot see
    (e.g. agreed across data-parallel ranks, or found by a grad scaler) passes ``found_inf`` to
    ``step`` to skip the same way. Deciding a skip costs two host reads per bucket (none per tensor),
    before anything is written: amax(g) finite, then the bounds (or, in a two-pass step, the amaxes).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *,
                 exp_avg_dtype: torch.dtype | str = torch.float8_e4m3fn,
                 exp_avg_sq_dtype: torch.dtype | str = torch.float16,
                 master_dtype: torch.dtype | str | None = torch.float16,
                 maximize: bool = False, amsgrad: bool = False, fused: bool | None = None,
                 compiled: bool | None = None,
                 fp8_weights: Mapping[torch.Tensor, Fp8WeightSink] | None = None,
                 rounding: str = "nearest", seed: int = 0) -> None:
        check_hyperparameters(_OWNER, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        check_rounding(_OWNER, rounding=rounding, seed=seed)
        if amsgrad is not False:
            raise ValueError(f"{_OWNER}.amsgrad={amsgrad!r} is not supported; allowed values: False "
                             "(a max of v would need a fourth state tensor with its own scale)")
        if fused not in (None, True, False):
            raise ValueError(f"{_OWNER}.fused={fused!r} is not allowed; allowed values: None, True, False")
        if compiled not in (None, True, False):
            raise ValueError(f"{_OWNER}.compiled={compiled!r} is not allowed; allowed values: None, True, False")
        self._formats: tuple[StateFormat, StateFormat, StateFormat | None] = (
            resolve_format(_OWNER, "exp_avg_dtype", exp_avg_dtype, EXP_AVG_FORMATS),
            resolve_format(_OWNER, "exp_avg_sq_dtype", exp_avg_sq_dtype, EXP_AVG_SQ_FORMATS),
            resolve_format(_OWNER, "master_dtype", master_dtype, MASTER_FORMATS),
        )
        if fused is True and load_kernel() is None:
            raise RuntimeError(f"{_OWNER}(fused=True): the fused CPU kernel cannot be built here "
                               "(no working C compiler); use fused=None or False")
        self._fused = fused  # None: decided per bucket at the first step (builds the kernel if needed)
        self._compiled = compiled  # None: decided per bucket by its device
        self._stochastic = rounding == "stochastic"
        self._seed = seed
        self._skipped_steps = 0
        self._pending_clip: PendingClip | None = None  # clip_grad_norm_'s, applied by the next step
        self.last_step_skipped = False
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults)
        self._fp8_weights = checked_fp8_weights(_OWNER, fp8_weights, self._all_params(),
                                                has_master=self._formats[2] is not None)

    # ---- configuration ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group.get("amsgrad", False):
            raise ValueError(f"{_OWNER} param_group amsgrad=True is not supported; allowed values: False")
        check_hyperparameters(f"{_OWNER}.param_groups[{len(self.param_groups) - 1}]", lr=group["lr"],
                              betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                              maximize=group["maximize"])
        for p in group["params"]:
            if p.dtype not in PARAM_DTYPES:
                raise ValueError(f"{_OWNER}: a parameter has dtype {p.dtype}; allowed parameter dtypes: "
                                 f"{', '.join(str(d) for d in PARAM_DTYPES)}")

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def fp8_weight_params(self) -> list[torch.Tensor]:
        """The parameters whose layer stores an FP8 primary weight (``fp8_weights``)."""
        return list(self._fp8_weights)

    @property
    def state_formats(self) -> dict[str, str | None]:
        """Storage format names of m, v and the master (None: no master)."""
        return {slot: None if fmt is None else fmt.name for slot, fmt in zip(SLOT_NAMES, self._formats)}

    # ---- state -----------------------------------------------------------------------------------

    def _positions(self) -> dict[int, int]:
        """id(parameter) -> the rounding key's input: its name's CRC-32 where the groups have ``param_names``
        (one key whichever optimizer holds it: ZeRO at any N, replicated), else its index over them."""
        params = self._all_params()
        if all("param_names" in g for g in self.param_groups):
            names = itertools.chain.from_iterable(g["param_names"] for g in self.param_groups)
            return {id(p): zlib.crc32(name.encode()) for p, name in zip(params, names)}
        return {id(p): i for i, p in enumerate(params)}

    def _init_state(self, p: torch.Tensor, position: int) -> dict[str, Any]:
        m_fmt, v_fmt, w_fmt = self._formats

        def scalar() -> torch.Tensor:
            return torch.zeros((), dtype=torch.float32, device=p.device)

        contiguous = dict(device=p.device, memory_format=torch.contiguous_format)
        shard, group = local(p), shard_group([p])  # a DTensor's state: its local shard, whole-tensor scales
        state = {
            "step": scalar(),
            STORED_KEYS["exp_avg"]: torch.zeros_like(shard, dtype=m_fmt.dtype, **contiguous),
            "exp_avg_log2_scale": scalar(),
            STORED_KEYS["exp_avg_sq"]: torch.zeros_like(shard, dtype=v_fmt.dtype, **contiguous),
            "exp_avg_sq_log2_scale": scalar(),
            "master_log2_scale": scalar(),
            _KEY: parameter_key(self._seed, position).to(p.device),
        }
        weight_amax = scalar()  # the next step bounds the new amaxes from this (m = v = 0; the master's amax)
        if w_fmt is not None:
            p_fp32 = local(initial_weight(p, self._fp8_weights.get(p))).to(torch.float32)
            amax = tensor_to_amax(p_fp32)
            sync_max_([amax], group)
            log2 = amax_to_log2_scale(amax, w_fmt.range) if w_fmt.scaled else scalar()
            master = state[STORED_KEYS["master"]] = torch.empty_like(shard, dtype=w_fmt.dtype, **contiguous)
            encode_([master], [p_fp32], [torch.exp2(log2)], w_fmt)
            state["master_log2_scale"] = log2
            weight_amax = tensor_to_amax(decode([master], [torch.exp2(-log2)])[0])
            sync_max_([weight_amax], group)
        state[RECORD_KEY] = initial_record(weight_amax)
        for key in (STORED_KEYS["exp_avg"], STORED_KEYS["exp_avg_sq"], STORED_KEYS["master"]):
            if key in state:  # DTensors laid out like p: torch.distributed.checkpoint reshards them
                state[key] = like_param(state[key], p)
        if p in self._fp8_weights:  # the master is now the only high-precision copy
            self._fp8_weights[p].release_high_precision_()
        return state

    def _buckets(self, group: dict[str, Any], grad_amax: Mapping[torch.Tensor, Any] | None = None,
                 grad_scale: float = 1.0) -> list[Bucket]:
        return [bucket for bucket, _ in self._buckets_with_params(group, grad_amax, grad_scale)]

    def _buckets_with_params(self, group: dict[str, Any], grad_amax: Mapping[torch.Tensor, Any] | None = None,
                             grad_scale: float = 1.0) -> list[tuple[Bucket, list[torch.Tensor]]]:
        """The group's buckets, each with its parameters (a bucket holds their outputs, ``weight_output``)."""
        members: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        positions = None
        for p in group["params"]:
            if p.grad is None or p.numel() == 0:  # an empty parameter has nothing to update
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{_OWNER} does not support sparse gradients")
            if not self.state[p]:
                positions = positions or self._positions()
                self.state[p] = self._init_state(p, positions[id(p)])
            out = local(weight_output(p, self._fp8_weights.get(p)))
            fused = self._fused is not False and fused_eligible(out, local(p.grad)) and load_kernel() is not None
            members.setdefault((p.device, p.dtype, p.grad.dtype, fused), []).append(p)
        buckets = []
        for (_, _, _, fused), params in members.items():
            states = [self.state[p] for p in params]
            steps = torch.stack([s["step"] for s in states]) + 1
            compiled = compiled_default(params[0].device) if self._compiled is None else self._compiled
            outputs = [local(weight_output(p, self._fp8_weights.get(p))) for p in params]
            buckets.append((Bucket(params=outputs, grads=[local(p.grad) for p in params], states=states,
                                  group=shard_group(params),
                                  formats=self._formats, coef=coef_matrix(steps, group, grad_scale), fused=fused,
                                  compiled=compiled,
                                  w_amax_needed=weight_amax_needed(self._formats[2], group),
                                  sr_keys=stream_keys(torch.stack([s[_KEY] for s in states]), steps)
                                  if self._stochastic else None, given_grad_amax=given_amax(params, grad_amax)),
                            params))
        return buckets

    # ---- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float,
                        reduce_sumsq: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` folded into the next ``step`` (optim/_clip.py): returns the total
        L2 norm (0-d fp32; non-finite if a gradient is) from one read of each gradient, which writes nothing;
        the next step scales each gradient by min(1, max_norm / (norm + 1e-6)) as it reads it. A gradient
        changed in between makes that step raise RuntimeError; ``zero_grad`` drops the pending clip.
        max_norm > 0 (math.inf: measure only). reduce_sumsq: the total from the (P,) float64 per-parameter sums
        of squares (``param_groups`` order, 0 without a gradient; DTensor shards already summed over their
        mesh), e.g. an all_reduce over ranks owning different parameters; default: their sum."""
        if isinstance(max_norm, bool) or not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ValueError(f"{_OWNER}.clip_grad_norm_: max_norm={max_norm!r} is not allowed; allowed: a number > 0")
        params, grad_amax = self._all_params(), {}
        sumsq, index = torch.zeros(len(params), dtype=torch.float64), {id(p): i for i, p in enumerate(params)}
        for group in self.param_groups:
            for bucket, members in self._buckets_with_params(group):
                amax, sq = bucket.grad_amax_and_sumsq()
                sumsq[[index[id(p)] for p in members]] = sq.cpu()
                grad_amax.update(zip(members, amax.unbind(0)))
        sync_sum_(sumsq, shard_group(params), params[0].device if params else None)
        total = reduce_sumsq(sumsq) if reduce_sumsq is not None else sumsq.sum()
        norm = total.to(torch.float64).sqrt().to(torch.float32)
        finite = bool(torch.isfinite(norm))  # else nothing pends: the step's own check skips such a step
        self._pending_clip = PendingClip.measured(clip_coefficient(norm, max_norm), grad_amax) if finite else None
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._pending_clip = None  # its gradients are gone
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             found_inf: torch.Tensor | bool | None = None,
             grad_amax: Mapping[torch.Tensor, torch.Tensor | float] | None = None) -> Any:
        """One AdamW step over every parameter with a gradient.

        found_inf: the caller's overflow verdict (bool or 0-d tensor, nonzero = overflow); if set,
                   the step is skipped before any work. The optimizer's own check (non-finite new
                   m / v / weight anywhere) skips it too. ``last_step_skipped`` tells which happened.
        grad_amax: {parameter: an UPPER bound of max |grad|} (e.g. the amax a gradient all-reduce shared):
                   saves a bucket with one for each parameter its read of the gradients. The exact amax
                   gives the same bits as None, a larger one coarser scales; non-finite skips the step.
                   After ``clip_grad_norm_``, its pending clip applies: the gradients are scaled by its
                   coefficient as they are read, and its exact amaxes replace ``grad_amax``.
        Returns the closure's loss, like every torch optimizer.
        """
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        pending, self._pending_clip = self._pending_clip, None
        if pending is not None:
            pending.check(_OWNER, self._all_params())
            grad_amax = pending.grad_amax  # exact, so never looser than a caller's bound
        grad_scale = pending.coef if pending is not None else 1.0
        self.last_step_skipped = found_inf is not None and bool(found_inf)
        if not self.last_step_skipped:
            buckets = [b for group in self.param_groups for b in self._buckets(group, grad_amax, grad_scale)]
            amaxes = amax_bounds(buckets)  # nothing written yet
            self.last_step_skipped = amaxes is None
            if amaxes is not None:
                for bucket, amax in zip(buckets, amaxes):
                    bucket.store(bucket.new_log2_scale(amax))
                # every bucket stored: the layers of FP8 primary weights cast their new values
                write_fp8_weights_((p for p in self._all_params() if p.grad is not None), self._fp8_weights)
        self._skipped_steps += int(self.last_step_skipped)
        return loss

    # ---- monitoring ------------------------------------------------------------------------------

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for overflow since construction (saved in ``state_dict``)."""
        return self._skipped_steps

    def log2_scales(self) -> dict[str, torch.Tensor]:
        """Scaling bias (log2 of the scale) of m, v and master per parameter, in ``param_groups`` order:
        {"exp_avg": (P,), ...} fp32 on the CPU; NaN without state yet, 0 if unscaled or no master."""
        params = self._all_params()
        nan = torch.tensor(float("nan"))
        return {slot: torch.stack([self.state[p][f"{slot}_log2_scale"].cpu() if self.state[p] else nan
                                   for p in params]) if params else torch.zeros(0)
                for slot in SLOT_NAMES}

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer state (moments, masters, scales, step counts)."""
        return sum(local(v).nbytes for state in self.state.values() for v in state.values() if torch.is_tensor(v))

    # ---- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's layout plus "fp8adamw": {skipped_steps, formats}; tensors keep their dtypes."""
        state_dict = super().state_dict()
        state_dict["fp8adamw"] = {"skipped_steps": self._skipped_steps, "formats": self.state_formats}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Bit-exact restore, all or nothing: the groups, formats and every state tensor are checked
        before anything changes, so a rejected state_dict (ValueError) leaves the optimizer as it was.
        The state tensors are copied as saved: torch's loader would cast each floating one to its
        parameter's dtype (right for AdamW, lossy here: an fp16 v beside a bf16 parameter would be
        re-rounded), so torch loads only the groups."""
        saved = state_dict.get("fp8adamw")
        if saved is None and any(key in s for s in state_dict["state"].values() for key in ("exp_avg", "exp_avg_sq")):
            raise ValueError(f"{_OWNER}.load_state_dict: the state_dict holds torch.optim.AdamW's moments (exp_avg, "
                             "exp_avg_sq in the parameter's units, no 'fp8adamw' entry); allowed: a state_dict "
                             "of Fp8AdamW")
        saved = saved or {}
        if saved.get("formats", self.state_formats) != self.state_formats:
            raise ValueError(f"{_OWNER}.load_state_dict: saved state formats {saved['formats']} differ from "
                             f"this optimizer's {self.state_formats}")
        mine = [len(g["params"]) for g in self.param_groups]
        theirs = [len(g["params"]) for g in state_dict["param_groups"]]
        if mine != theirs:
            raise ValueError(f"{_OWNER}.load_state_dict: the saved parameter group sizes {theirs} differ from this "
                             f"optimizer's {mine}")
        for i, group in enumerate(state_dict["param_groups"]):
            check_hyperparameters(f"{_OWNER}.load_state_dict param_groups[{i}]", lr=group.get("lr"),
                                  betas=group.get("betas"), eps=group.get("eps"),
                                  weight_decay=group.get("weight_decay"), maximize=group.get("maximize"))
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        states = {p: loaded_state(_OWNER, state_dict["state"][saved_id], p, self._formats,
                                  parameter_key(self._seed, position))
                  for position, (saved_id, p) in enumerate(zip(saved_ids, params)) if saved_id in state_dict["state"]}
        # nothing has changed so far; torch restores the groups (hyperparameters), then the states go in
        super().load_state_dict({**state_dict, "state": {}})
        for p, state in states.items():
            self.state[p] = state
            if p in self._fp8_weights:  # the loaded master replaces the parameter's values
                self._fp8_weights[p].release_high_precision_()
        self._skipped_steps = int(saved.get("skipped_steps", 0))
