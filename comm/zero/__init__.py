"""fp8train.comm.zero: whole-tensor ZeRO-1/2 on the FP8 wire of ``fp8train.comm``.

Every parameter, with its optimizer state, lives on exactly one owner rank (``partition``); owners
step an ordinary inner optimizer (``optimizer``), and their new weights travel in all-gathers of
bounded buckets, FP8 for the named compute weights (``_weights``). ``checkpoint`` saves the state by parameter name,
so a run resumes on any world size.
"""

from fp8train.comm.zero.checkpoint import MANIFEST_NAME, load_zero_checkpoint, read_zero_manifest, save_zero_checkpoint
from fp8train.comm.zero.optimizer import ZeroConfig, ZeroOptimizer, ZeroStepResult, predicted_state_nbytes
from fp8train.comm.zero.partition import Partition, partition_parameters

__all__ = [
    # the optimizer
    "ZeroConfig",
    "ZeroOptimizer",
    "ZeroStepResult",
    "predicted_state_nbytes",
    # who owns what
    "Partition",
    "partition_parameters",
    # checkpoints
    "MANIFEST_NAME",
    "load_zero_checkpoint",
    "read_zero_manifest",
    "save_zero_checkpoint",
]
