"""The trainer's parts: typed configs, distributed setup, strategies, loop, checkpoints, monitoring.
``fp8train.train.train(cfg)`` puts them together; ``fp8train.cli`` is the Hydra edge."""

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

__all__ = [
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
