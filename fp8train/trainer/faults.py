"""Fault injection for testing recovery (``faults.*`` in the config; all off by default).

Kills, crashes and hangs fire only in a run that starts from scratch (not resumed from a checkpoint)
on torchrun's first attempt (TORCHELASTIC_RESTART_COUNT == 0): a restarted or resumed job runs
clean and must recover on its own.
  nonfinite_step / nonfinite_rank / nonfinite_value: multiply that rank's loss by inf or nan on the
      last micro-step of optimizer step ``nonfinite_step`` (1-based): its gradients become
      non-finite before synchronisation, as an overflow in the forward or backward would make them;
  nonfinite_where: "loss" (the above, default) or "activation_grad": instead, put the value into one
      element of the gradient flowing into the output of the model's first FP8 linear layer (its
      first ``nn.Linear`` if none is FP8), on that rank's last micro-step of that step: an overflow
      inside the backward, which must reach the gradients through the FP8 casts (fp8train/scaling_state.py)
      although the casts clamp inf;
  kill_step / kill_rank: SIGKILL that rank when step ``kill_step`` starts (a lost node);
  crash_in_checkpoint_step: SIGKILL rank 0 while the checkpoint of that step is half written
      (every file written, not yet committed);
  hang_step / hang_rank: that rank stops answering (sleeps) when step ``hang_step`` starts, so
      the others must fail with a timeout (``launcher.timeout_s``) instead of hanging.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fp8train.linear import Fp8Linear
from fp8train.trainer.hooks import StepHook

__all__ = ["FaultsConfig", "Faults"]

NONFINITE_WHERE = ("loss", "activation_grad")


@dataclass(kw_only=True, slots=True)
class FaultsConfig:
    """See the module docstring; steps are 1-based optimizer steps, None = never."""

    nonfinite_step: int | None = None
    nonfinite_rank: int = 0
    # a float too: Hydra's override grammar reads `faults.nonfinite_value=inf` (or nan) as a float
    nonfinite_value: Literal["inf", "nan"] | float = "inf"
    nonfinite_where: Literal["loss", "activation_grad"] = "loss"
    kill_step: int | None = None
    kill_rank: int = 0
    crash_in_checkpoint_step: int | None = None
    hang_step: int | None = None
    hang_rank: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.nonfinite_value, float):
            if not (math.isnan(self.nonfinite_value) or self.nonfinite_value == math.inf):
                raise ValueError(f"FaultsConfig.nonfinite_value={self.nonfinite_value!r} is not allowed; "
                                 "allowed values: 'inf', 'nan'")
            self.nonfinite_value = "nan" if math.isnan(self.nonfinite_value) else "inf"
        if self.nonfinite_where not in NONFINITE_WHERE:
            raise ValueError(f"FaultsConfig.nonfinite_where={self.nonfinite_where!r} is not allowed; "
                             f"allowed values: {', '.join(repr(w) for w in NONFINITE_WHERE)}")
        for name in ("nonfinite_step", "kill_step", "crash_in_checkpoint_step", "hang_step"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"FaultsConfig.{name}={value} is out of range; allowed: null or integers >= 1")
        for name in ("nonfinite_rank", "kill_rank", "hang_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"FaultsConfig.{name}={getattr(self, name)} is out of range; allowed: >= 0")


class Faults(StepHook):
    """The faults of ``cfg`` as a step hook (the first of the loop's list; see fp8train.trainer.hooks)."""

    def __init__(self, cfg: FaultsConfig, rank: int, *, resumed: bool, model: nn.Module) -> None:
        self.cfg, self.rank, self.model = cfg, rank, model
        self.first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0 and not resumed

    def _nonfinite(self, step: int, where: str) -> float | None:
        """inf/nan on the rank, step and place chosen for a non-finite gradient, else None."""
        c = self.cfg
        if c.nonfinite_step == step and c.nonfinite_rank == self.rank and c.nonfinite_where == where:
            return math.inf if c.nonfinite_value == "inf" else math.nan
        return None

    def on_loss(self, step: int, micro: int, loss: torch.Tensor, *, last: bool) -> torch.Tensor:
        """The last micro-step's loss times inf/nan on the rank and step chosen for a non-finite loss
        (an injected overflow); every other loss is returned as it is."""
        value = self._nonfinite(step, "loss") if last else None
        return loss if value is None else loss * value

    def micro_step_context(self, step: int, micro: int, *, last: bool) -> contextlib.AbstractContextManager[None]:
        """Around a micro-step's forward and backward: on the last micro-step of the rank and step
        chosen with ``nonfinite_where="activation_grad"``, the gradient arriving at the first FP8
        (else plain) linear layer's output gets inf/nan in one element; elsewhere it does nothing."""
        value = self._nonfinite(step, "activation_grad") if last else None
        if value is None:
            return contextlib.nullcontext()
        return _poisoned_output_grad(_first_linear(self.model), value)

    def on_step_start(self, step: int) -> None:
        c = self.cfg
        if c.kill_step == step and c.kill_rank == self.rank and self.first_attempt:
            print(f"faults: killing rank {self.rank} at the start of step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if c.hang_step == step and c.hang_rank == self.rank and self.first_attempt:
            print(f"faults: rank {self.rank} stops answering at step {step}", flush=True)
            while True:
                time.sleep(3600)

    def before_commit(self, step: int) -> None:
        """After a checkpoint's files are written, before it is committed."""
        if self.cfg.crash_in_checkpoint_step == step and self.rank == 0 and self.first_attempt:
            print(f"faults: killing rank 0 while checkpoint step {step} is half written", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def _first_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    fp8 = [m for m in linears if isinstance(m, Fp8Linear)]
    if not linears:
        raise ValueError("faults.nonfinite_where='activation_grad' needs a model with an nn.Linear layer; "
                         "allowed values for this model: 'loss'")
    return (fp8 or linears)[0]


@contextlib.contextmanager
def _poisoned_output_grad(layer: nn.Module, value: float) -> Iterator[None]:
    """While open, every forward of ``layer`` hooks its output so that the gradient flowing into it
    has ``value`` in its first element (a copy is changed, never autograd's buffer)."""
    def poison(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        grad.view(-1)[0] = value
        return grad

    def hook_output(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if output.requires_grad:  # not under no_grad (evaluation)
            output.register_hook(poison)

    handle = layer.register_forward_hook(hook_output)
    try:
        yield
    finally:
        handle.remove()
