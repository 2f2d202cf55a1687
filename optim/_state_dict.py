"""Loading one parameter's saved Fp8AdamW state: a checked copy, or a one-line ValueError.

A state from another optimizer or model must not reach the kernels, which read each state with its
configured dtype and the parameter's size; ``Fp8AdamW.load_state_dict`` checks every parameter's
state with ``loaded_state`` before it changes anything (all or nothing)."""

from __future__ import annotations

from typing import Any

import torch

from fp8train.optim._bounds import RECORD
from fp8train.optim._bucket import RECORD_KEY
from fp8train.optim._eager import STORED_KEYS
from fp8train.optim._formats import StateFormat

__all__ = ["ROUNDING_KEY", "SCALE_KEYS", "loaded_state"]

SCALE_KEYS = ("step", "exp_avg_log2_scale", "exp_avg_sq_log2_scale", "master_log2_scale")
ROUNDING_KEY = "rounding_key"  # 0-d int64 per parameter: its stochastic-rounding key (``_rounding``)


def loaded_state(owner: str, saved: dict[str, Any], p: torch.Tensor,
                 formats: tuple[StateFormat, StateFormat, StateFormat | None],
                 default_key: torch.Tensor) -> dict[str, Any]:
    """A checked copy of one parameter's saved state, on its device. States saved before STORED_KEYS
    existed held the codes under the slot names; those saved before stochastic rounding existed get
    ``default_key`` (this optimizer's key for the parameter)."""
    if not any(key in saved for key in STORED_KEYS.values()):
        saved = {STORED_KEYS.get(k, k): v for k, v in saved.items()}
    state = {k: v.detach().to(device=p.device, copy=True).contiguous() if torch.is_tensor(v) else v
             for k, v in saved.items()}
    m_fmt, v_fmt, w_fmt = formats
    expected = {STORED_KEYS["exp_avg"]: m_fmt.dtype, STORED_KEYS["exp_avg_sq"]: v_fmt.dtype}
    if w_fmt is not None:
        expected[STORED_KEYS["master"]] = w_fmt.dtype
    for key, dtype in expected.items():
        value = state.get(key)
        if not torch.is_tensor(value) or value.dtype != dtype or value.shape != p.shape:
            found = "missing" if not torch.is_tensor(value) else f"{value.dtype} {tuple(value.shape)}"
            raise ValueError(f"{owner}.load_state_dict: state {key!r} is {found}; expected {dtype} "
                             f"{tuple(p.shape)}")
    for key in SCALE_KEYS:
        if not torch.is_tensor(state.get(key)) or state[key].numel() != 1:
            raise ValueError(f"{owner}.load_state_dict: state {key!r} must be a 0-d tensor")
        state[key] = state[key].to(torch.float32).reshape(())
    record = state.get(RECORD_KEY)  # absent in states saved before records: the next step takes two passes
    if record is not None and not (torch.is_tensor(record) and record.dtype == torch.float32
                                   and record.shape == (len(RECORD),)):
        raise ValueError(f"{owner}.load_state_dict: state {RECORD_KEY!r} must be a ({len(RECORD)},) "
                         "float32 tensor")
    key = state.get(ROUNDING_KEY)
    if not torch.is_tensor(key) or key.numel() != 1 or key.dtype != torch.int64:
        if key is not None:
            raise ValueError(f"{owner}.load_state_dict: state {ROUNDING_KEY!r} must be a 0-d int64 tensor")
        key = default_key
    state[ROUNDING_KEY] = key.reshape(()).to(p.device)
    return state
