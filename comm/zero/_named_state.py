"""An inner optimizer's state keyed by parameter NAME instead of by position, so that ZeRO state saved
under one partition loads under another (docs/design.md: checkpoints store state by name, not by rank).

Generic over ``torch.optim.Optimizer``: torch's ``state_dict()`` numbers the parameters in
``param_groups`` order; here each number is replaced by the parameter's name, and each parameter
carries its group's hyperparameters (lr, betas, weight_decay, ...). Loading builds the positional
dict the optimizer's own ``load_state_dict`` expects for the parameters it holds NOW, so the
optimizer's checks and dtype policy apply unchanged:
  - ``Fp8AdamW``: every state tensor is copied as is (bit-exact; formats and shapes checked);
  - ``torch.optim.AdamW`` and other torch optimizers: torch casts floating state tensors to the
    parameter's dtype (a no-op for state they created themselves, so still bit-exact) and keeps
    ``step`` as saved.
Top-level keys besides "state" and "param_groups" (``Fp8AdamW``'s "fp8adamw": formats and its own
skip counter) are rank-local: they travel as ``extra`` and are loaded as given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["load_named_state", "named_state", "optimizer_formats"]

# group entries that are not hyperparameters: the members themselves, and their names (torch's named
# param groups), which depend on which parameters a rank owns
_MEMBERS = ("params", "param_names")


def optimizer_formats(optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """What a checkpoint of this optimizer's state needs to match on load: the class, and the
    storage formats when the optimizer declares them (``Fp8AdamW.state_formats``)."""
    if optimizer is None:
        return {"optimizer": None, "state_formats": None}
    cls = type(optimizer)
    formats = getattr(optimizer, "state_formats", None)
    return {"optimizer": f"{cls.__module__}.{cls.__qualname__}",
            "state_formats": dict(formats) if formats is not None else None}


def named_state(optimizer: torch.optim.Optimizer, name_of: Mapping[int, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """({name: {"state": {...}, "group": {hyperparameters}}}, extra) for every parameter the
    optimizer holds (``name_of``: id(parameter) -> name). The tensors alias the live state, as in
    torch's ``state_dict()``: serialise or clone them before the next step."""
    sd = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out: dict[str, Any] = {}
    for saved_group in sd["param_groups"]:
        hyper = {k: v for k, v in saved_group.items() if k not in _MEMBERS}
        for idx in saved_group["params"]:
            out[name_of[id(params[idx])]] = {"state": dict(sd["state"].get(idx, {})), "group": hyper}
    extra = {k: v for k, v in sd.items() if k not in ("state", "param_groups")}
    return out, extra


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    return bool(a == b)


def load_named_state(optimizer: torch.optim.Optimizer, name_of: Mapping[int, str],
                     param_state: Mapping[str, Any], extra: Mapping[str, Any], where: str) -> None:
    """Load the entries of ``param_state`` for the parameters this optimizer holds (others are
    ignored). Raises ``ValueError`` naming a held parameter without an entry, or two parameters that
    now share a param_group but were saved with different hyperparameters."""
    groups: list[dict[str, Any]] = []
    state: dict[int, Any] = {}
    idx = 0
    for group in optimizer.param_groups:
        names: Sequence[str] = [name_of[id(p)] for p in group["params"]]
        for name in names:
            if name not in param_state:
                raise ValueError(f"{where}: no saved optimizer state for parameter {name!r}, which this rank owns")
        hyper = ({k: v for k, v in param_state[names[0]]["group"].items() if k not in _MEMBERS} if names
                 else {k: v for k, v in group.items() if k not in _MEMBERS})
        for name in names[1:]:
            other = param_state[name]["group"]
            for key in (hyper.keys() | other.keys()) - set(_MEMBERS):
                if not _same(hyper.get(key), other.get(key)):
                    raise ValueError(f"{where}: parameters {names[0]!r} and {name!r} share a param_group now but "
                                     f"were saved with {key}={hyper.get(key)!r} and {other.get(key)!r}")
        ids = []
        for name in names:
            if param_state[name]["state"]:
                state[idx] = param_state[name]["state"]
            ids.append(idx)
            idx += 1
        names_now = {"param_names": group["param_names"]} if "param_names" in group else {}
        groups.append({**hyper, **names_now, "params": ids})
    optimizer.load_state_dict({**extra, "state": state, "param_groups": groups})
