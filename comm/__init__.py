"""fp8train.comm: FP8 gradient all-reduce with a globally-synced scale (the wire: allreduce, codec,
pipeline, collectives, DDP hook, stats) and whole-tensor ZeRO (``fp8train.comm.zero``), on stock
torch.distributed collectives. Installed as ``fp8train.comm``; never import it as a
top-level ``comm`` (that name belongs to Jupyter)."""

from fp8train.comm._layout import FlatLayout, plan_buckets, uniform_bounds
from fp8train.comm.allreduce import fp8_all_reduce_, fp8_reduce_scatter
from fp8train.comm.config import Fp8CommConfig
from fp8train.comm.ddp_hook import Fp8CommHookState, fp8_comm_hook, register_fp8_comm_hook
from fp8train.comm.stats import CommStats
from fp8train.comm.zero import (
    MANIFEST_NAME,
    Partition,
    ZeroConfig,
    ZeroOptimizer,
    ZeroStepResult,
    load_zero_checkpoint,
    partition_parameters,
    predicted_state_nbytes,
    read_zero_manifest,
    save_zero_checkpoint,
)

__all__ = [
    # configuration and monitoring
    "CommStats",
    "Fp8CommConfig",
    # gradient synchronisation
    "fp8_all_reduce_",
    "fp8_reduce_scatter",
    # DDP
    "Fp8CommHookState",
    "fp8_comm_hook",
    "register_fp8_comm_hook",
    # whole-tensor ZeRO
    "Partition",
    "partition_parameters",
    "ZeroConfig",
    "ZeroOptimizer",
    "ZeroStepResult",
    "predicted_state_nbytes",
    "save_zero_checkpoint",
    "load_zero_checkpoint",
    "read_zero_manifest",
    "MANIFEST_NAME",
    # layout helpers
    "FlatLayout",
    "plan_buckets",
    "uniform_bounds",
]
