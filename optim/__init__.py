"""fp8train.optim: precision-decoupled AdamW (FP8 first moment, FP16 second moment, scaled master
weights). Installed as ``fp8train.optim``; never import it as a top-level ``optim``."""

from fp8train.optim._formats import EXP_AVG_FORMATS, EXP_AVG_SQ_FORMATS, MASTER_FORMATS
from fp8train.optim.adamw import Fp8AdamW
from fp8train.optim.config import Fp8AdamWConfig, check_hyperparameters, check_lr, state_format_names

__all__ = [
    # optimizer
    "Fp8AdamW",
    # config and the one validation of its settings (the trainer's configs delegate here)
    "Fp8AdamWConfig",
    "check_hyperparameters",
    "check_lr",
    "state_format_names",
    # state format names: m, v and the master weight ("e4m3" | "bf16" | "fp16" | "fp32"; None: no master)
    "EXP_AVG_FORMATS",
    "EXP_AVG_SQ_FORMATS",
    "MASTER_FORMATS",
]
