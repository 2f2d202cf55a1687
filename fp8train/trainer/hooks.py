"""Step hooks: cross-cutting concerns of the training step (fault injection, FP8 statistics) as ONE
list the loop drives, instead of calls placed by hand in the loop body.

A step, as the loop runs it, with the hook points (steps are 1-based optimizer steps)::

    on_step_start(step)
    for each micro-step:  with accumulating(sync), forward context, micro_step_context(step, micro, last=...):
                              loss = forward;  loss = on_loss(step, micro, loss, last=...);  backward
    outcome = strategy.step();  metrics = after_step(step, outcome);  zero_grad
    log line (every logging.log_every steps): + interval_metrics()
    checkpoint: before_commit(step), once its files are written and before it is committed

``StepHooks`` calls each point on every hook in list order (``on_loss`` chains: each hook gets the
loss the one before it returned; contexts nest, the first hook's outermost). Hooks run on every rank;
a hook that is collective on some step (the FP8 statistics gather) must be so on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fp8train.trainer.strategy import StepOutcome

__all__ = ["StepHook", "StepHooks"]


class StepHook:
    """Base of a step hook: every point is a no-op; override the ones the concern needs."""

    def on_step_start(self, step: int) -> None:
        """Before the first micro-step of ``step`` (after the learning rate is set)."""

    def micro_step_context(self, step: int, micro: int, *, last: bool) -> AbstractContextManager[None]:
        """A context around micro-step ``micro``'s forward and backward (``last``: the one that
        synchronises gradients)."""
        return nullcontext()

    def on_loss(self, step: int, micro: int, loss: torch.Tensor, *, last: bool) -> torch.Tensor:
        """The micro-step's loss before ``backward``; what it returns is backpropagated and logged.
        Return ``loss`` itself to leave it alone (multiplying by 1 would add an op to the graph)."""
        return loss

    def before_commit(self, step: int) -> None:
        """A checkpoint of ``step`` has every file written and is not committed yet."""

    def after_step(self, step: int, outcome: StepOutcome) -> dict[str, float]:
        """After the optimizer step (before ``zero_grad``): metrics of this step to log ({}: none)."""
        return {}

    def interval_metrics(self) -> dict[str, float]:
        """At a log line: metrics summed since the previous one (the hook resets them)."""
        return {}


class StepHooks:
    """The loop's hook list: each point fans out to every hook, in order."""

    def __init__(self, hooks: Iterable[StepHook]) -> None:
        self.hooks: tuple[StepHook, ...] = tuple(hooks)

    def __iter__(self) -> Iterator[StepHook]:
        return iter(self.hooks)

    def __len__(self) -> int:
        return len(self.hooks)

    def on_step_start(self, step: int) -> None:
        for hook in self.hooks:
            hook.on_step_start(step)

    @contextmanager
    def micro_step_context(self, step: int, micro: int, *, last: bool) -> Iterator[None]:
        with ExitStack() as stack:
            for hook in self.hooks:
                stack.enter_context(hook.micro_step_context(step, micro, last=last))
            yield

    def on_loss(self, step: int, micro: int, loss: torch.Tensor, *, last: bool) -> torch.Tensor:
        for hook in self.hooks:
            loss = hook.on_loss(step, micro, loss, last=last)
        return loss

    def before_commit(self, step: int) -> None:
        for hook in self.hooks:
            hook.before_commit(step)

    def after_step(self, step: int, outcome: StepOutcome) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for hook in self.hooks:
            metrics.update(hook.after_step(step, outcome))
        return metrics

    def interval_metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for hook in self.hooks:
            metrics.update(hook.interval_metrics())
        return metrics
