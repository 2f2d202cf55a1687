"""fp8train.optim: precision-decoupled AdamW (FP8 first moment, FP16 second moment, scaled master
weights). Installed as ``fp8train.optim``; never import it as a top-level ``optim``."""

from fp8train.optim.adamw import Fp8AdamW
from fp8train.optim.config import Fp8AdamWConfig

__all__ = [
    # optimizer
    "Fp8AdamW",
    # config
    "Fp8AdamWConfig",
]
