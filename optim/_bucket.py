"""A bucket: the tensors of one param group that one call can update together (same device, same
parameter and gradient dtypes), with the per-tensor coefficients and scales of this step.

The step of a bucket reads every tensor once: the scales come from upper bounds of the new amaxes
(``_bounds``: each step records a few numbers per tensor, the next one bounds its new values with them
and amax(g)), so the one store pass computes the update, stores it and records. Its only other read is
amax(g) (``grad_amax``; none where the caller gives an upper bound of it), finished before the store
pass starts (the store pass may write an FP8 primary weight into the gradient's buffer). The optimizer
decides (over all buckets) whether the step is skipped before any bucket writes. A bucket whose bounds
are unusable (no record yet, e.g. a state saved before records existed; non-finite bounds) takes two
passes: ``pass1`` computes the exact amax of the new values without writing, the store pass then stores
with those fresh scales (and records, so the next step is one pass again).

The foreach path can run compiled (``compiled``; by default on accelerators): each pass is one
``torch.compile``d graph over the whole bucket, so inductor fuses the ~20 foreach ops of a step into
a few kernels instead of ~20 launches per op over every tensor (and the per-tensor dtype casts of
decode into the same loops). Same operations in the same order: on CPU the compiled passes are
bit-identical to the eager ones (tested).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from fp8train.optim._bounds import bounds_, next_record, tau
from fp8train.optim._eager import COEF_NAMES, STORED_KEYS, eager_step, eager_update_and_amax
from fp8train.optim._formats import PARAM_DTYPES, StateFormat
from fp8train.optim._kernel import KernelArgs, load_kernel
from fp8train.optim._sharded import local, sync_max_
from fp8train.scaling import amax_to_log2_scale

__all__ = ["RECORD_KEY", "Bucket", "amax_bounds", "coef_matrix", "compiled_default", "fused_eligible", "given_amax",
           "weight_amax_needed"]

_NO_MASTER = -1
_M, _V, _W = STORED_KEYS["exp_avg"], STORED_KEYS["exp_avg_sq"], STORED_KEYS["master"]
RECORD_KEY = "bound_record"  # per-parameter (len(_bounds.RECORD),) fp32: what the next step's bounds need
_COLS = {name: j for j, name in enumerate(COEF_NAMES)}
_BITS_DTYPE = {torch.float8_e4m3fn: torch.uint8, torch.float16: torch.int16, torch.bfloat16: torch.int16,
               torch.float32: torch.int32}


def coef_matrix(steps: torch.Tensor, group: dict[str, Any], grad_scale: float = 1.0) -> torch.Tensor:
    """(n, len(COEF_NAMES)) fp32 coefficients of this step for tensors at step numbers ``steps``
    (the step being taken, >= 1). Computed in float64 and rounded once, as torch does with the Python
    floats of its single-tensor AdamW. ``grad_scale``: an fp32 value every gradient is multiplied by
    (a clip coefficient), folded into grad_mul with maximize's sign (exact)."""
    t = steps.to(torch.float64)
    beta1, beta2 = group["betas"]
    lr, wd = float(group["lr"]), group["weight_decay"]
    full = {
        "one_minus_beta1": 1.0 - beta1, "beta2": beta2, "one_minus_beta2": 1.0 - beta2,
        "decay": 1.0 - lr * wd, "eps": group["eps"], "grad_mul": -grad_scale if group["maximize"] else grad_scale,
    }
    computed = {"step_size": lr / (1.0 - beta1**t), "bc2_sqrt_inv": (1.0 - beta2**t).rsqrt()}
    cols = [computed[name] if name in computed else torch.full_like(t, full[name]) for name in COEF_NAMES]
    return torch.stack(cols, dim=1).to(torch.float32)


def weight_amax_needed(master_fmt: StateFormat | None, group: dict[str, Any]) -> bool:
    """Whether the step must bound (or pass 1 compute) the new weight's amax: when it sets a scaled
    master's scale, or when finite moments could still give a non-finite weight. They cannot if
    eps > 0, lr / ((1 - beta1) eps) < 1e18 and lr * weight_decay <= 1:
    |g| < 1.9e19 (else g * g, so v, overflows and the step is skipped), hence |m1| < 1.9e19,
    step_size <= lr / (1 - beta1), denom >= eps, so |step_size * m1 / denom| < 1.9e37 < fp32 max,
    and |w * (1 - lr * weight_decay)| <= |w|."""
    if master_fmt is not None and master_fmt.scaled:
        return True
    lr, beta1, eps = float(group["lr"]), group["betas"][0], group["eps"]
    return not (eps > 0 and lr / ((1.0 - beta1) * eps) < 1e18 and lr * group["weight_decay"] <= 1.0)


def given_amax(params: list[torch.Tensor], grad_amax: Any) -> torch.Tensor | None:
    """(n,) fp32 caller-given upper bounds of max |grad| of ``params`` (``Fp8AdamW.step(grad_amax=)``),
    or None unless the mapping has one for every parameter (the bucket then reads its gradients)."""
    if grad_amax is None or not all(p in grad_amax for p in params):
        return None
    device = params[0].device  # where the bucket's own amax(g) would be (``grad_amax``)
    values = [grad_amax[p] for p in params]
    if all(torch.is_tensor(v) and v.dim() == 0 and v.dtype == torch.float32 and v.device == device for v in values):
        return torch.stack(values).detach()  # the usual case: one op for the bucket
    return torch.stack([torch.as_tensor(v, dtype=torch.float32).detach().reshape(()).to(device) for v in values])


def fused_eligible(param: torch.Tensor, grad: torch.Tensor) -> bool:
    """The C kernel takes contiguous CPU tensors of the dtypes it decodes."""
    return (param.device.type == "cpu" and grad.device == param.device and param.is_contiguous()
            and grad.is_contiguous() and param.dtype in PARAM_DTYPES and grad.dtype in PARAM_DTYPES)


def compiled_default(device: torch.device) -> bool:
    """Compile the foreach path by default where launches dominate: on accelerators, not on CPU
    (where the fused C kernel runs, and compiling would cost start-up time for nothing)."""
    return device.type != "cpu"


@functools.cache
def _compiled(fn):
    """``fn`` compiled once per process (fullgraph: a graph break would be a silent slowdown).
    Numerical decision: ``emulate_precision_casts``. By default inductor keeps a value that is
    rounded to fp16/bf16 and read back within one kernel in fp32, skipping the rounding: the
    parameter would get the unrounded new weight instead of the fp16 master's value, and the step
    would no longer be the eager one. With it, every cast rounds as written."""
    return torch.compile(fn, fullgraph=True, options={"emulate_precision_casts": True})


def _ptrs(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def _code_values(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n,) fp32 values of stored codes given as their bit patterns (int32, sign cleared) in ``dtype``."""
    return bits.to(_BITS_DTYPE[dtype]).view(dtype).to(torch.float32)


@dataclass(slots=True)
class Bucket:
    """params / grads / states: parallel lists (states are the optimizer's per-parameter dicts).
    formats: (m, v, master) storage formats; master None when the parameter is the master.
    coef:    (n, len(COEF_NAMES)) fp32 step coefficients.
    fused:   run the C kernel (CPU, contiguous, kernel built) instead of the foreach path.
    compiled: run the foreach path's passes as compiled graphs (ignored when ``fused``).
    w_amax_needed: see ``weight_amax_needed`` (the kernel's pass 1 may skip the weight otherwise;
             the foreach path always computes it)."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    states: list[dict[str, Any]]
    formats: tuple[StateFormat, StateFormat, StateFormat | None]
    coef: torch.Tensor
    fused: bool
    compiled: bool = False
    w_amax_needed: bool = True
    sr_keys: torch.Tensor | None = None  # (n, 2) int64 stream keys: stochastic rounding; None: nearest
    given_grad_amax: torch.Tensor | None = None  # (n,) fp32 caller's upper bounds of max |g| (``given_amax``)
    group: Any = None  # the process group of sharded (DTensor) parameters: records agreed over it (_sharded.py)
    log2_scale: torch.Tensor = field(init=False)  # (n, 3) fp32 scaling biases in use: m, v, master

    def __post_init__(self) -> None:
        self.log2_scale = torch.stack([self._column_states(key) for key in self._scale_keys()], dim=1)

    @staticmethod
    def _scale_keys() -> tuple[str, str, str]:
        return ("exp_avg_log2_scale", "exp_avg_sq_log2_scale", "master_log2_scale")

    def _column_states(self, key: str) -> torch.Tensor:
        return torch.stack([s[key] for s in self.states])

    def _list(self, key: str) -> list[torch.Tensor]:
        return [local(s[key]) for s in self.states]

    @property
    def has_master(self) -> bool:
        return self.formats[2] is not None

    def _weights(self) -> list[torch.Tensor]:
        return self._list(_W) if self.has_master else self.params

    # ---- before any write: amax(g), bounds, or pass 1 ----------------------------------------------

    def grad_amax(self) -> torch.Tensor:
        """(n,) fp32 max |g| per tensor; non-finite where a gradient is (one read of each gradient), or
        the caller's upper bounds of it: the bounds only need max |g| from above."""
        if self.given_grad_amax is not None:
            return self.given_grad_amax
        if self.fused:
            out = torch.zeros(len(self.params), dtype=torch.float32)
            self._call_kernel("fp8adamw_grad_amax", grad_amax=out)
            return out
        return torch.stack(torch._foreach_norm(self.grads, ord=float("inf"))).to(torch.float32)

    def grad_amax_and_sumsq(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) fp32 max |g| and (n,) float64 sum of g**2 per tensor, from one read of each gradient where
        the kernel runs (``csrc/fp8adamw_gradstats.h``: squares and sums in double, relative error ~1e-8
        measured); the foreach path reads twice and takes fp32 norms (``torch._foreach_norm``, ~1e-6), so
        the two may differ in the low bits. Non-finite where a gradient is."""
        if self.fused:
            amax = torch.zeros(len(self.params), dtype=torch.float32)
            sumsq = torch.zeros(len(self.params), dtype=torch.float64)
            self._call_kernel("fp8adamw_grad_amax", grad_amax=amax, grad_sumsq=sumsq)
            return amax, sumsq
        amax = torch.stack(torch._foreach_norm(self.grads, ord=float("inf"))).to(torch.float32)
        norms = torch._foreach_norm(self.grads, ord=2, dtype=torch.float32)  # fp32 even for bf16 gradients
        return amax, torch.stack(norms).to(torch.float64).square()

    def bounds(self, grad_amax: torch.Tensor) -> torch.Tensor | None:
        """(n, 3) fp32 upper bounds of the new amax of m, v, w (``_bounds``), or None where this step
        cannot bound them: a state without a record, or a parameter that is its own master with a
        weight that could overflow (its values may have been changed outside the optimizer)."""
        if any(RECORD_KEY not in s for s in self.states) or (self.w_amax_needed and not self.has_master):
            return None
        record = torch.stack(self._list(RECORD_KEY))
        return bounds_(record, grad_amax, self.coef, _COLS, weight_needed=self.w_amax_needed)

    def pass1(self) -> torch.Tensor:
        """Two-pass steps only: (n, 3) fp32 exact amax of the new m, v, w; non-finite where the gradient
        makes them so. Writes nothing."""
        scale_inv = torch.exp2(-self.log2_scale)
        if self.fused:
            amax = torch.zeros(len(self.params), 3, dtype=torch.float32)
            self._call_kernel("fp8adamw_pass1", scale_inv=scale_inv, amax=amax)
            return amax
        update = _compiled(eager_update_and_amax) if self.compiled else eager_update_and_amax
        return update(self.grads, self._list(_M), self._list(_V), self._weights(), self.coef, scale_inv)[1]

    def new_log2_scale(self, amax: torch.Tensor) -> torch.Tensor:
        """Scaling biases from an amax or an upper bound of it (``amax_to_log2_scale``: 0 keeps the
        previous one); unscaled formats (bf16, fp32) keep 0."""
        cols = []
        for j, fmt in enumerate(self.formats):
            prev = self.log2_scale[:, j]
            scaled = fmt is not None and fmt.range is not None
            cols.append(amax_to_log2_scale(amax[:, j], fmt.range, prev_log2_scale=prev) if scaled else prev)
        return torch.stack(cols, dim=1)

    # ---- the store pass ------------------------------------------------------------------------------

    def store(self, new_log2_scale: torch.Tensor) -> None:
        """Store states with the new scales, write the parameters, advance steps and scales, record."""
        new_scale = torch.exp2(new_log2_scale)
        thresholds = tau(self.formats[1], new_log2_scale[:, 1])
        if self.fused:
            bits = torch.zeros(len(self.params), 6, dtype=torch.int32)
            self._call_kernel("fp8adamw_store", scale_inv=torch.exp2(-self.log2_scale), new_scale=new_scale,
                              tau=thresholds, stats=bits)
            m_fmt, v_fmt, w_fmt = self.formats
            stats = torch.stack([_code_values(bits[:, 0], m_fmt.dtype), _code_values(bits[:, 1], v_fmt.dtype),
                                 _code_values(bits[:, 2], (w_fmt or m_fmt).dtype)]
                                + list(bits[:, 3:].view(torch.float32).unbind(1)), dim=1)
        else:
            master = self._list(_W) if self.has_master else None
            step = _compiled(eager_step) if self.compiled else eager_step
            stats = step(self.grads, self._list(_M), self._list(_V), self._weights(), self.coef,
                         torch.exp2(-self.log2_scale), self.params, master, self.formats, new_scale, self.sr_keys,
                         thresholds)
        records = next_record(stats, new_log2_scale, self.coef, _COLS, self.formats)
        sync_max_([records], self.group)  # sharded: the records of the whole tensors (_sharded.py)
        torch._foreach_add_(self._list("step"), 1.0)
        for j, key in enumerate(self._scale_keys()):
            torch._foreach_copy_(self._list(key), list(new_log2_scale[:, j].unbind(0)))
        if all(RECORD_KEY in s for s in self.states):  # one op, not one clone per tensor
            torch._foreach_copy_(self._list(RECORD_KEY), list(records.unbind(0)))
        else:  # a state saved before records existed
            for state, record in zip(self.states, records.unbind(0)):
                state[RECORD_KEY] = record.clone()

    def _call_kernel(self, name: str, **arrays: torch.Tensor) -> None:
        """Call ``name`` with this bucket's pointer tables and the given fp32 / int32 arrays (scale_inv,
        new_scale, amax, tau, stats, grad_amax; absent ones get a dummy) and float64 grad_sumsq (absent: NULL)."""
        m_fmt, v_fmt, w_fmt = self.formats
        n = len(self.params)
        dummy = torch.zeros(max(n, 1) * 6)
        keep = {  # int64 pointer tables and fp32 matrices, alive for the duration of the call
            "numel": torch.tensor([p.numel() for p in self.params], dtype=torch.int64),
            "grad": _ptrs(self.grads), "param": _ptrs(self.params),
            "exp_avg": _ptrs(self._list(_M)), "exp_avg_sq": _ptrs(self._list(_V)),
            "master": _ptrs(self._list(_W)) if self.has_master else torch.zeros(1, dtype=torch.int64),
            "coef": self.coef.contiguous(),
            "sr_key": self.sr_keys.contiguous() if self.sr_keys is not None else torch.zeros(1, dtype=torch.int64),
        }
        for key in ("scale_inv", "new_scale", "amax", "tau", "stats", "grad_amax"):
            keep[key] = arrays[key].contiguous() if key in arrays else dummy
        sumsq = arrays.get("grad_sumsq")  # NULL: the kernel computes no sums of squares
        args = KernelArgs(
            grad_sumsq=sumsq.data_ptr() if sumsq is not None else None,
            n_tensors=n, **{k: v.data_ptr() for k, v in keep.items()},
            grad_dtype=PARAM_DTYPES[self.grads[0].dtype], param_dtype=PARAM_DTYPES[self.params[0].dtype],
            exp_avg_dtype=m_fmt.code, exp_avg_sq_dtype=v_fmt.code,
            master_dtype=w_fmt.code if w_fmt is not None else _NO_MASTER, n_threads=torch.get_num_threads(),
            w_amax_needed=int(self.w_amax_needed), rounding=int(self.sr_keys is not None),
        )
        if getattr(load_kernel(), name)(ctypes.byref(args)) != 0:
            raise MemoryError(f"fp8train.optim: {name} could not allocate its work table")


def amax_bounds(buckets: list[Bucket]) -> list[torch.Tensor] | None:
    """Per bucket, (n, 3) upper bounds of the new amaxes of m, v, w (one-pass step), or their exact
    values (``pass1``, where a bound is unusable); None when the step must be skipped: a non-finite
    gradient (then m is non-finite), or a non-finite exact amax. Finite bounds prove the new values
    finite, so a step with bounds everywhere decides without computing them. Writes nothing."""
    grad_amax = [b.grad_amax() for b in buckets]  # every gradient read before any write
    finite = all(bool(torch.isfinite(a).all()) for a in grad_amax)
    sharded = [b.group for b in buckets if b.group is not None]
    if not finite and not sharded:
        return None
    amaxes = []
    for bucket, a_g in zip(buckets, grad_amax):
        bound = bucket.bounds(a_g) if finite else None
        usable = bound is not None and bool(torch.isfinite(bound).all())
        amaxes.append(bound if usable else bucket.pass1() if finite else
                      torch.full((len(bucket.params), 3), float("inf")))
    if sharded:  # whole-tensor scales, and one verdict on every rank (optim/_sharded.py)
        sync_max_(amaxes, sharded[0])
    return amaxes if all(bool(torch.isfinite(a).all()) for a in amaxes) else None
