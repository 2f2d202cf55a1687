"""FP8 gradient communication for plain ``DistributedDataParallel``, in one line:

    state = register_fp8_comm_hook(ddp_model, Fp8CommConfig())
    loss.backward()                          # DDP calls the hook once per bucket
    stats = state.pop_stats()                # bytes, scales (by parameter name), found_inf of this step
    if not stats.found_inf:
        optimizer.step()

Gradient accumulation: inside ``ddp_model.no_sync()`` DDP accumulates ``.grad`` in its own
precision and calls no hook; the step that syncs quantizes the accumulated sum once.
"""

# No "from __future__ import annotations": DDP checks that the hook's bucket annotation IS
# dist.GradBucket, so annotations must stay objects.
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fp8train.comm.allreduce import _all_reduce_bucket, _check_grads
from fp8train.comm.config import Fp8CommConfig
from fp8train.comm.stats import CommStats

__all__ = ["Fp8CommHookState", "fp8_comm_hook", "register_fp8_comm_hook"]


@dataclass(kw_only=True, slots=True)
class Fp8CommHookState:
    """config: wire format and sampling; group: the process group (None: DDP's default);
    calls: hook calls so far (drives ``config.stats_every``); stats: merged stats since the last
    ``pop_stats``; param_names: {id(parameter): name}, so that ``stats.tensor_names`` can name the
    bucket's gradients (empty: the stats carry no names)."""

    config: Fp8CommConfig = field(default_factory=Fp8CommConfig)
    group: dist.ProcessGroup | None = None
    calls: int = 0
    stats: CommStats = field(default_factory=CommStats)
    param_names: dict[int, str] = field(default_factory=dict)

    def pop_stats(self) -> CommStats:
        """This step's stats (all buckets merged), resetting them for the next step."""
        stats, self.stats = self.stats, CommStats()
        return stats


def fp8_comm_hook(state: Fp8CommHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's gradients averaged over ranks through the FP8 all-reduce.
    Runs synchronously and returns a completed future. On overflow (inf/NaN on any rank) the buffer is
    returned unchanged and ``state.stats.found_inf`` is set on every rank."""
    buffer = bucket.buffer()
    params = bucket.parameters()
    grads, pos = [], 0
    for p in params:  # the buffer holds the bucket's gradients flat, in parameter order
        grads.append(buffer[pos:pos + p.numel()])
        pos += p.numel()
    _check_grads(grads)
    sample = state.config.stats_every > 0 and state.calls % state.config.stats_every == 0
    state.calls += 1
    stats = _all_reduce_bucket(grads, state.config, state.group, sample)
    names = [state.param_names.get(id(p)) for p in params]  # log2_scales follow the bucket's order
    if None not in names:
        stats.tensor_names = tuple(names)
    state.stats = state.stats.merge(stats)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(buffer)
    return future


def register_fp8_comm_hook(model: DistributedDataParallel, config: Fp8CommConfig | None = None,
                           group: dist.ProcessGroup | None = None) -> Fp8CommHookState:
    """Make ``model`` (a DDP module) average its gradients in FP8; returns the hook's state."""
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(f"register_fp8_comm_hook needs a DistributedDataParallel module, got {type(model).__name__}")
    state = Fp8CommHookState(config=config or Fp8CommConfig(), group=group,
                             param_names={id(p): n for n, p in model.module.named_parameters()})
    model.register_comm_hook(state, fp8_comm_hook)
    return state
