"""Fault injection for testing recovery (``faults.*`` in the config; all off by default).

Kills, crashes and hangs fire only in a run that starts from scratch (not resumed from a checkpoint)
on torchrun's first attempt (TORCHELASTIC_RESTART_COUNT == 0): a restarted or resumed job runs
clean and must recover on its own.
  nonfinite_step / nonfinite_rank / nonfinite_value: multiply that rank's loss by inf or nan on the
      last micro-step of optimizer step ``nonfinite_step`` (1-based): its gradients become
      non-finite before synchronisation, as an overflow in the forward or backward would make them;
  kill_step / kill_rank: SIGKILL that rank when step ``kill_step`` starts (a lost node);
  crash_in_checkpoint_step: SIGKILL rank 0 while the checkpoint of that step is half written
      (every file written, not yet committed);
  hang_step / hang_rank: that rank stops answering (sleeps) when step ``hang_step`` starts, so
      the others must fail with a timeout (``launcher.timeout_s``) instead of hanging.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Literal

__all__ = ["FaultsConfig", "Faults"]


@dataclass(kw_only=True, slots=True)
class FaultsConfig:
    """See the module docstring; steps are 1-based optimizer steps, None = never."""

    nonfinite_step: int | None = None
    nonfinite_rank: int = 0
    # a float too: Hydra's override grammar reads `faults.nonfinite_value=inf` (or nan) as a float
    nonfinite_value: Literal["inf", "nan"] | float = "inf"
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
        for name in ("nonfinite_step", "kill_step", "crash_in_checkpoint_step", "hang_step"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"FaultsConfig.{name}={value} is out of range; allowed: null or integers >= 1")
        for name in ("nonfinite_rank", "kill_rank", "hang_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"FaultsConfig.{name}={getattr(self, name)} is out of range; allowed: >= 0")


class Faults:
    def __init__(self, cfg: FaultsConfig, rank: int, *, resumed: bool) -> None:
        self.cfg, self.rank = cfg, rank
        self.first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0 and not resumed

    def loss_factor(self, step: int) -> float:
        """1.0, or inf/nan on the rank and step chosen for a non-finite gradient."""
        c = self.cfg
        if c.nonfinite_step == step and c.nonfinite_rank == self.rank:
            return math.inf if c.nonfinite_value == "inf" else math.nan
        return 1.0

    def at_step_start(self, step: int) -> None:
        c = self.cfg
        if c.kill_step == step and c.kill_rank == self.rank and self.first_attempt:
            print(f"faults: killing rank {self.rank} at the start of step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if c.hang_step == step and c.hang_rank == self.rank and self.first_attempt:
            print(f"faults: rank {self.rank} stops answering at step {step}", flush=True)
            while True:
                time.sleep(3600)

    def in_checkpoint(self, step: int) -> None:
        """Called after a checkpoint's files are written, before it is committed."""
        if self.cfg.crash_in_checkpoint_step == step and self.rank == 0 and self.first_attempt:
            print(f"faults: killing rank 0 while checkpoint step {step} is half written", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
