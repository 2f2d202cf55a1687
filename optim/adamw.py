"""``Fp8AdamW``: AdamW whose moments and master weight are stored in low precision with per-tensor
power-of-two scales (precision-decoupled: each state gets the precision it needs).

State per parameter (default dtypes; every one is configurable):
    exp_avg_scaled     m, float8_e4m3fn  + exp_avg_log2_scale       1 byte / element
    exp_avg_sq_scaled  v, float16        + exp_avg_sq_log2_scale    2 bytes
    master_scaled      w, float16        + master_log2_scale        2 bytes (absent with master_dtype=None)
    step               number of steps taken (0-d fp32)
Stored value = x * 2**log2_scale. The keys differ from torch AdamW's "exp_avg" / "exp_avg_sq" on
purpose (``_eager.STORED_KEYS``): neither optimizer can take the other's state for its own.
A step decodes the states to fp32 (exact: power-of-two scales), computes the AdamW update in fp32
(``_eager.py`` gives the formula), and re-encodes m, v and the master with fresh scales from the
amax of the new values (``fp8train.scaling.amax_to_log2_scale``: the amax maps just under the
format's max; amax 0 keeps the previous scale). The parameter then
receives the master's new value (decoded, rounded to the parameter's dtype), or the new fp32 weight
itself when it is its own master. Numerical consequences (tested against torch.optim.AdamW):
  - fp32 states: the same trajectory as torch.optim.AdamW up to fp32 rounding.
  - e4m3 m: each stored m carries a relative error <= 2**-4 (3 mantissa bits, round to nearest even);
    elements below amax * 2**-17 (e4m3's subnormal floor after scaling) flush to 0.
  - fp16 master: 11 significant bits; an update smaller than half an ulp of the weight (2**-11 |w|)
    is lost: with lr 1e-3 that happens where |w| exceeds ~2 |m_hat / sqrt(v_hat)|.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fp8train.optim._bucket import Bucket, coef_matrix, compiled_default, fused_eligible, weight_amax_needed
from fp8train.optim._eager import SLOT_NAMES, STORED_KEYS
from fp8train.optim._formats import (
    EXP_AVG_FORMATS,
    EXP_AVG_SQ_FORMATS,
    MASTER_FORMATS,
    PARAM_DTYPES,
    StateFormat,
    encode_,
    resolve_format,
)
from fp8train.optim._kernel import load_kernel
from fp8train.optim.config import check_hyperparameters
from fp8train.scaling import amax_to_log2_scale, tensor_to_amax

__all__ = ["Fp8AdamW"]

_OWNER = "Fp8AdamW"
_SCALE_KEYS = ("step", "exp_avg_log2_scale", "exp_avg_sq_log2_scale", "master_log2_scale")


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
    compiled:         the foreach path as two torch.compile'd graphs per bucket (one launch-light
                      step instead of ~20 foreach launches per op): None (default) on accelerators
                      (CUDA), not on CPU; True / False: always / never. Bit-identical on CPU.

    Overflow: a step whose gradients make any new m, v or weight non-finite is skipped as a whole
    (every group, every parameter: states, scales, step counts and parameters stay bit-identical),
    and counted in ``skipped_steps``. A caller that knows of an overflow the optimizer cannot see
    (e.g. agreed across data-parallel ranks, or found by a grad scaler) passes ``found_inf`` to
    ``step`` to skip the same way. Deciding a skip costs one host read per step (none per tensor).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *,
                 exp_avg_dtype: torch.dtype | str = torch.float8_e4m3fn,
                 exp_avg_sq_dtype: torch.dtype | str = torch.float16,
                 master_dtype: torch.dtype | str | None = torch.float16,
                 maximize: bool = False, amsgrad: bool = False, fused: bool | None = None,
                 compiled: bool | None = None) -> None:
        check_hyperparameters(_OWNER, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
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
        self._skipped_steps = 0
        self.last_step_skipped = False
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults)

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

    @property
    def state_formats(self) -> dict[str, str | None]:
        """Storage format names of m, v and the master (None: no master)."""
        return {slot: None if fmt is None else fmt.name for slot, fmt in zip(SLOT_NAMES, self._formats)}

    # ---- state -----------------------------------------------------------------------------------

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        m_fmt, v_fmt, w_fmt = self._formats

        def scalar() -> torch.Tensor:
            return torch.zeros((), dtype=torch.float32, device=p.device)

        contiguous = dict(device=p.device, memory_format=torch.contiguous_format)
        state = {
            "step": scalar(),
            STORED_KEYS["exp_avg"]: torch.zeros_like(p, dtype=m_fmt.dtype, **contiguous),
            "exp_avg_log2_scale": scalar(),
            STORED_KEYS["exp_avg_sq"]: torch.zeros_like(p, dtype=v_fmt.dtype, **contiguous),
            "exp_avg_sq_log2_scale": scalar(),
            "master_log2_scale": scalar(),
        }
        if w_fmt is not None:
            p_fp32 = p.detach().to(torch.float32)
            log2 = amax_to_log2_scale(tensor_to_amax(p_fp32), w_fmt.range) if w_fmt.scaled else scalar()
            master = state[STORED_KEYS["master"]] = torch.empty_like(p, dtype=w_fmt.dtype, **contiguous)
            encode_([master], [p_fp32], [torch.exp2(log2)], w_fmt)
            state["master_log2_scale"] = log2
        return state

    def _buckets(self, group: dict[str, Any]) -> list[Bucket]:
        members: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is None or p.numel() == 0:  # an empty parameter has nothing to update
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{_OWNER} does not support sparse gradients")
            if not self.state[p]:
                self.state[p] = self._init_state(p)
            fused = self._fused is not False and fused_eligible(p, p.grad) and load_kernel() is not None
            members.setdefault((p.device, p.dtype, p.grad.dtype, fused), []).append(p)
        buckets = []
        for (_, _, _, fused), params in members.items():
            states = [self.state[p] for p in params]
            steps = torch.stack([s["step"] for s in states]) + 1
            compiled = compiled_default(params[0].device) if self._compiled is None else self._compiled
            buckets.append(Bucket(params=params, grads=[p.grad for p in params], states=states,
                                  formats=self._formats, coef=coef_matrix(steps, group), fused=fused,
                                  compiled=compiled,
                                  w_amax_needed=weight_amax_needed(self._formats[2], group)))
        return buckets

    # ---- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             found_inf: torch.Tensor | bool | None = None) -> Any:
        """One AdamW step over every parameter with a gradient.

        found_inf: the caller's overflow verdict (bool or 0-d tensor, nonzero = overflow); if set,
                   the step is skipped before any work. The optimizer's own check (non-finite new
                   m / v / weight anywhere) skips it too. ``last_step_skipped`` tells which happened.
        Returns the closure's loss, like every torch optimizer.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_step_skipped = found_inf is not None and bool(found_inf)
        if not self.last_step_skipped:
            buckets = [b for group in self.param_groups for b in self._buckets(group)]
            amaxes = [b.pass1() for b in buckets]  # writes nothing
            self.last_step_skipped = not all(bool(torch.isfinite(a).all()) for a in amaxes)
            if not self.last_step_skipped:
                for bucket, amax in zip(buckets, amaxes):
                    bucket.pass2(bucket.new_log2_scale(amax))
        self._skipped_steps += int(self.last_step_skipped)
        return loss

    # ---- monitoring ------------------------------------------------------------------------------

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for overflow since construction (saved in ``state_dict``)."""
        return self._skipped_steps

    def log2_scales(self) -> dict[str, torch.Tensor]:
        """Scaling bias (log2 of the scale) of m, v and master per parameter, in the order of
        ``param_groups``: {"exp_avg": (P,), "exp_avg_sq": (P,), "master": (P,)} fp32 on the CPU;
        NaN for parameters without state yet, 0 for unscaled formats (bf16, fp32) or no master."""
        params = [p for group in self.param_groups for p in group["params"]]
        nan = torch.tensor(float("nan"))
        return {slot: torch.stack([self.state[p][f"{slot}_log2_scale"].cpu() if self.state[p] else nan
                                   for p in params]) if params else torch.zeros(0)
                for slot in SLOT_NAMES}

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer state (moments, masters, scales, step counts)."""
        return sum(v.nbytes for state in self.state.values() for v in state.values() if torch.is_tensor(v))

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
        states = {p: self._loaded_state(state_dict["state"][saved_id], p)
                  for saved_id, p in zip(saved_ids, params) if saved_id in state_dict["state"]}
        # nothing has changed so far; torch restores the groups (hyperparameters), then the states go in
        super().load_state_dict({**state_dict, "state": {}})
        for p, state in states.items():
            self.state[p] = state
        self._skipped_steps = int(saved.get("skipped_steps", 0))

    def _loaded_state(self, saved: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """A checked copy of one parameter's saved state, on its device. A state from another optimizer
        or model must not reach the kernels, which read each state with its configured dtype and the
        parameter's size. States saved before STORED_KEYS existed held the codes under the slot names."""
        if not any(key in saved for key in STORED_KEYS.values()):
            saved = {STORED_KEYS.get(k, k): v for k, v in saved.items()}
        state = {k: v.detach().to(device=p.device, copy=True).contiguous() if torch.is_tensor(v) else v
                 for k, v in saved.items()}
        m_fmt, v_fmt, w_fmt = self._formats
        expected = {STORED_KEYS["exp_avg"]: m_fmt.dtype, STORED_KEYS["exp_avg_sq"]: v_fmt.dtype}
        if w_fmt is not None:
            expected[STORED_KEYS["master"]] = w_fmt.dtype
        for key, dtype in expected.items():
            value = state.get(key)
            if not torch.is_tensor(value) or value.dtype != dtype or value.shape != p.shape:
                found = "missing" if not torch.is_tensor(value) else f"{value.dtype} {tuple(value.shape)}"
                raise ValueError(f"{_OWNER}.load_state_dict: state {key!r} is {found}; expected {dtype} "
                                 f"{tuple(p.shape)}")
        for key in _SCALE_KEYS:
            if not torch.is_tensor(state.get(key)) or state[key].numel() != 1:
                raise ValueError(f"{_OWNER}.load_state_dict: state {key!r} must be a 0-d tensor")
            state[key] = state[key].to(torch.float32).reshape(())
        return state
