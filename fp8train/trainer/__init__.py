"""fp8train.trainer: everything a training run needs beyond the library -- typed configs, data,
precision presets, distributed setup, strategies, the loop, checkpoints and resume, run logging,
FP8 statistics and plots. ``train(cfg)`` (fp8train.trainer.run) puts them together;
``fp8train.trainer.cli`` is the Hydra edge (the ``fp8train`` command)."""

from fp8train.trainer.config import (
    CheckpointConfig,
    HfModelConfig,
    LauncherConfig,
    LoggingConfig,
    LoopConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    train_config_from_mapping,
    train_config_to_mapping,
)
from fp8train.trainer.run import TrainResult, train

__all__ = [
    # one run
    "train",
    "TrainResult",
    # the run's configuration
    "TrainConfig",
    "ModelConfig",
    "HfModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "LoggingConfig",
    "LauncherConfig",
    "LoopConfig",
    "CheckpointConfig",
    # conversion from / to plain mappings (what Hydra composes, what run_dir/config.yaml holds)
    "train_config_from_mapping",
    "train_config_to_mapping",
]
