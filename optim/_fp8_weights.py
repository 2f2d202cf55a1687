"""FP8 primary weights seen from the optimizer: parameters whose layer stores the weight in FP8
(``fp8train.Fp8Linear(fp8_weight=True)``), so that the high-precision value lives only in
``Fp8AdamW``'s master.

For such a parameter the optimizer
  - starts the master from the parameter's values (or, when the layer has already released them,
    from the stored FP8 weight), then has the layer release them (``release_high_precision_``);
  - writes the new weight, the master decoded and rounded to the parameter's dtype exactly as it
    would write a high-precision parameter, into the parameter's GRADIENT buffer (the parameter
    itself has a single element of storage; the gradient is consumed by the step and has the
    parameter's shape and dtype; every path reads an element's gradient before it writes that
    element's weight), then hands it to the layer (``set_weight_``: the layer's E4M3 cast) and
    frees the buffer (``grad = None``).
Numerics: the layer casts the value a high-precision parameter would have held, with the recipe
its forward would have used, so FP8 primary weights compute what high-precision ones do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import torch

__all__ = ["Fp8WeightSink", "checked_fp8_weights", "initial_weight", "weight_output", "write_fp8_weights_"]


class Fp8WeightSink(Protocol):
    """What the optimizer needs of a layer with an FP8 primary weight."""

    @property
    def holds_high_precision_weight(self) -> bool: ...

    @property
    def high_precision_weight(self) -> torch.Tensor: ...

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def release_high_precision_(self) -> None: ...

    def set_weight_(self, weight_hp: torch.Tensor) -> None: ...


def checked_fp8_weights(owner: str, fp8_weights: Mapping[torch.Tensor, Fp8WeightSink] | None,
                        params: Iterable[torch.Tensor], has_master: bool) -> dict[torch.Tensor, Fp8WeightSink]:
    """``fp8_weights`` as a dict keyed by parameter (identity); ValueError naming what is wrong."""
    sinks = dict(fp8_weights or {})
    if not sinks:
        return sinks
    if not has_master:
        raise ValueError(f"{owner}.fp8_weights needs master_dtype 'fp16', 'bf16' or 'fp32' (got None): the "
                         "master is the only high-precision copy of an FP8 primary weight")
    known = {id(p) for p in params}
    for p, sink in sinks.items():
        if id(p) not in known:
            raise ValueError(f"{owner}.fp8_weights: a key (shape {tuple(p.shape)}) is not one of the optimizer's "
                             "parameters")
        if not callable(getattr(sink, "set_weight_", None)):
            raise ValueError(f"{owner}.fp8_weights: the value for a parameter of shape {tuple(p.shape)} is a "
                             f"{type(sink).__name__}; expected a layer with set_weight_ (Fp8Linear(fp8_weight=True))")
    return sinks


def initial_weight(p: torch.Tensor, sink: Fp8WeightSink | None) -> torch.Tensor:
    """The value a master starts from: the parameter's, or the sink's high-precision weight while it holds
    one (a sharded sink: this rank's shard of it), else the stored FP8 weight."""
    if sink is None:
        return p.detach()
    if sink.holds_high_precision_weight:
        return sink.high_precision_weight.detach()
    return sink.dequantized_weight(torch.float32)


def weight_output(p: torch.Tensor, sink: Fp8WeightSink | None) -> torch.Tensor:
    """Where the step writes parameter ``p``'s new value: ``p``, or its gradient buffer for an FP8
    primary weight (module docstring)."""
    return p if sink is None else p.grad


def write_fp8_weights_(stepped: Iterable[torch.Tensor], sinks: Mapping[torch.Tensor, Fp8WeightSink]) -> None:
    """After a step that was taken: each FP8 primary weight's layer casts its new value (written into
    the gradient buffer by the step), then the buffer is freed (``grad = None``): it no longer holds a
    gradient, and the weight all-gather that follows under ZeRO then runs without it. A sink with a
    ``commit_group`` (a sharded weight, whose scale its mesh agrees on: comm/fsdp_fp8_weights.py) only
    takes the value; its group's ``commit_()`` casts all of them at once, after the last."""
    groups = {}
    for p in stepped:
        sink = sinks.get(p)
        if sink is not None:
            sink.set_weight_(p.grad)
            p.grad = None
            group = getattr(sink, "commit_group", None)
            if group is not None:
                groups[id(group)] = group
    for group in groups.values():
        group.commit_()
