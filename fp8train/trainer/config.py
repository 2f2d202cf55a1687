"""``TrainConfig``: everything one training run needs, as typed dataclasses.

The Hydra groups in ``configs/`` fill these one to one (model, data, precision, optim, parallel,
logging, launcher; ``train`` and ``checkpoint`` live in the primary config). ``train_config_from_mapping``
turns a composed (plain) config tree into a ``TrainConfig`` with one-line errors naming the key;
``TrainConfig.__post_init__`` rejects bad combinations the same way.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fp8train.errors import ConfigError
from fp8train.models.gpt import GPTConfig
from fp8train.models.llama import LlamaConfig
from fp8train.optim import check_hyperparameters, check_lr
from fp8train.trainer._typed import build_dataclass, to_plain
from fp8train.trainer.data import DataConfig
from fp8train.trainer.faults import FaultsConfig
from fp8train.trainer.precision import PrecisionConfig

__all__ = [
    "CheckpointConfig", "HfModelConfig", "LauncherConfig", "LoggingConfig", "LoopConfig", "ModelConfig", "MonitorConfig",
    "OptimConfig", "ParallelConfig", "TrainConfig", "train_config_from_mapping", "train_config_to_mapping",
    "unknown_key_message",
]


@dataclass(kw_only=True, slots=True)
class HfModelConfig:
    """A Hugging Face ``transformers`` causal LM built from its config class, randomly initialised
    (nothing is downloaded). config: ``{"_target_": "transformers.LlamaConfig", **kwargs}``;
    vocab_size and block_size override the config's vocabulary and position fields."""

    vocab_size: int = 256
    block_size: int = 128
    config: dict[str, Any] = field(default_factory=lambda: {"_target_": "transformers.LlamaConfig"})

    def __post_init__(self) -> None:
        if not isinstance(self.config.get("_target_"), str):
            raise ValueError("HfModelConfig.config._target_ is missing; allowed: a dotted transformers config "
                             "class such as 'transformers.LlamaConfig'")


ARCHS: dict[str, type] = {"gpt": GPTConfig, "llama": LlamaConfig, "hf": HfModelConfig}


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """name: label for run names; spec: the architecture's own config (GPTConfig, LlamaConfig or
    HfModelConfig). In YAML the spec's fields sit beside ``name`` and ``arch``."""

    name: str = "gpt_tiny"
    spec: GPTConfig | LlamaConfig | HfModelConfig = field(default_factory=GPTConfig)

    @property
    def arch(self) -> str:
        return next(a for a, cls in ARCHS.items() if isinstance(self.spec, cls))


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    """AdamW hyperparameters and the learning-rate schedule (per optimizer step); lr, beta1, beta2,
    eps and weight_decay are validated by ``fp8train.optim.check_hyperparameters`` (their one rule).
    lr: peak learning rate; min_lr: floor of the cosine decay; warmup_steps: linear warm-up from
    lr/warmup_steps to lr; schedule: "cosine" (to min_lr at train.steps) | "constant" (after warm-up);
    max_grad_norm: clip the global L2 gradient norm to this (None: no clipping)."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    schedule: Literal["cosine", "constant"] = "cosine"
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        # AdamW's own settings follow fp8train.optim's one rule (the same for torch AdamW and Fp8AdamW)
        check_hyperparameters("OptimConfig", lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                              weight_decay=self.weight_decay, beta_fields=("beta1", "beta2"))
        check_lr("OptimConfig", "min_lr", self.min_lr)
        if self.min_lr > self.lr:
            raise ValueError(f"OptimConfig.min_lr={self.min_lr} is above lr={self.lr}; allowed: min_lr <= lr")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps={self.warmup_steps} is out of range; allowed: integers >= 0")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"OptimConfig.max_grad_norm={self.max_grad_norm!r} is out of range; allowed: null or > 0")


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """strategy: "auto" (zero2 when precision.fp8_weights, else ddp) | "ddp" (replicated weights and
    optimizer; gradients all-reduced) | "zero1" (optimizer state sharded by whole tensors) | "zero2"
    (gradients too) | "fsdp2" (torch's ``fully_shard`` per block and the root: weights, gradients and
    optimizer state sharded; FP8 reduce-scatter and weight all-gather with precision.grad_comm='fp8') |
    "deepspeed" (the DeepSpeed engine, ZeRO stage ``deepspeed_stage``); ddp_bucket_mb: DDP gradient
    bucket size in MiB; deepspeed_stage: DeepSpeed ZeRO stage, 0-3."""

    strategy: Literal["auto", "ddp", "zero1", "zero2", "fsdp2", "deepspeed"] = "auto"
    ddp_bucket_mb: int = 25
    deepspeed_stage: int = 2

    def __post_init__(self) -> None:
        if self.ddp_bucket_mb < 1:
            raise ValueError(f"ParallelConfig.ddp_bucket_mb={self.ddp_bucket_mb} is out of range; allowed: >= 1")
        if self.deepspeed_stage not in (0, 1, 2, 3):
            raise ValueError(f"ParallelConfig.deepspeed_stage={self.deepspeed_stage} is out of range; allowed: 0, 1, 2, 3")


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """wandb: "offline" (files under run_dir/wandb, ``wandb sync`` later) | "online" | "disabled";
    project: wandb project; log_every: metrics.jsonl / wandb record every k steps; console_every:
    console line every k steps (and at every validation); progress: tqdm bar on rank 0."""

    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "fp8train"
    log_every: int = 10
    console_every: int = 50
    progress: bool = True

    def __post_init__(self) -> None:
        if self.log_every < 1 or self.console_every < 1:
            raise ValueError(f"LoggingConfig.log_every={self.log_every} / console_every={self.console_every} out "
                             "of range; allowed: integers >= 1")


@dataclass(kw_only=True, slots=True)
class MonitorConfig:
    """FP8 scale dynamics (fp8train.trainer.fp8_stats). every: sample every k steps (0: never): scaling
    bias, amax, saturated and underflowed fractions of every FP8 tensor role and Fp8AdamW's state
    scales; histograms: also log wandb histograms of the bias across layers per linear type; plots:
    write PNG plots (fp8train.trainer.plots) into run_dir/plots at the end of the run."""

    every: int = 10
    histograms: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"MonitorConfig.every={self.every} is out of range; allowed: integers >= 0")


@dataclass(kw_only=True, slots=True)
class LauncherConfig:
    """How this process joins the job. env: "torchrun" (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
    MASTER_PORT, and LOCAL_WORLD_SIZE or the DeepSpeed launcher's LOCAL_SIZE, as those launchers set
    them; none set = one process) |
    "slurm" (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, MASTER_ADDR/MASTER_PORT from the batch
    script); backend: "auto" (nccl on CUDA, else gloo) | "gloo" | "nccl"; device: "auto" (CUDA
    when available) | "cpu" | "cuda"; timeout_s: collective timeout in seconds; cpu_threads: torch
    intra-op threads per process (None: cores / local processes)."""

    name: str = "local"
    env: Literal["torchrun", "slurm"] = "torchrun"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    timeout_s: int = 600
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        if self.timeout_s < 1 or (self.cpu_threads is not None and self.cpu_threads < 1):
            raise ValueError(f"LauncherConfig.timeout_s={self.timeout_s} / cpu_threads={self.cpu_threads} out of "
                             "range; allowed: timeout_s >= 1, cpu_threads null or >= 1")


@dataclass(kw_only=True, slots=True)
class LoopConfig:
    """steps: optimizer steps; micro_batch_size: sequences per rank per micro-step; grad_accum_steps:
    micro-steps per optimizer step (gradients accumulate in high precision and are quantized once);
    eval_every: validation every k steps (0: only at the end); eval_batches: micro-batches per rank
    per validation; stop_after: end this invocation after this step (saving a checkpoint), with the
    schedule still planned for ``steps``: a later run with resume=auto continues (time-limited jobs);
    compile: torch.compile each transformer block (fullgraph; fp8train/trainer/compile.py).
    Tokens per step = micro_batch_size x block_size x grad_accum_steps x world size."""

    steps: int = 200
    micro_batch_size: int = 16
    grad_accum_steps: int = 1
    eval_every: int = 50
    eval_batches: int = 8
    stop_after: int | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        for name, lo in (("steps", 1), ("micro_batch_size", 1), ("grad_accum_steps", 1), ("eval_every", 0),
                         ("eval_batches", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"LoopConfig.{name}={getattr(self, name)} is out of range; allowed: integers >= {lo}")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise ValueError(f"LoopConfig.stop_after={self.stop_after} is out of range; allowed: null or 1..steps")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """every: save every k steps (0: only at the end); keep_last: complete checkpoints kept (older
    ones are deleted after a newer one is complete)."""

    every: int = 100
    keep_last: int = 2

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep_last < 1:
            raise ValueError(f"CheckpointConfig.every={self.every} / keep_last={self.keep_last} out of range; "
                             "allowed: every >= 0, keep_last >= 1")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """name: run label; run_dir: where checkpoints, metrics and logs go (shared by all ranks);
    resume: "auto" (continue from the latest complete checkpoint in run_dir, if any) | "never"
    (refuse a run_dir that holds checkpoints) | a checkpoint directory path; seed: model init and
    data order; faults: fault injection for recovery tests (off by default)."""

    name: str = "gpt_tiny-fp8_o2"
    run_dir: str = "outputs/gpt_tiny-fp8_o2"
    resume: str = "auto"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def __post_init__(self) -> None:
        strategy = self.strategy
        if self.precision.fp8_weights and strategy in ("ddp", "deepspeed"):
            raise ValueError(f"precision={self.precision.name} (fp8_weights) needs parallel zero1, zero2 or fsdp2 (got "
                             f"{strategy}): FP8 weights are gathered by ZeRO owners or FSDP2; allowed parallel: auto, "
                             "zero1, zero2, fsdp2")
        if self.precision.fp8_weights and strategy == "fsdp2":
            fp8 = self.precision.fp8
            if fp8.granularity != "tensor" or fp8.recipe != "current":
                raise ValueError(f"precision.fp8.granularity={fp8.granularity!r} / recipe={fp8.recipe!r} with "
                                 "fp8_weights and parallel=fsdp2: its shards agree on one scale per tensor from the "
                                 "whole tensor's amax; allowed: granularity=tensor with recipe=current")
        if strategy == "deepspeed" and self.precision.grad_comm != "native":
            raise ValueError(f"parallel=deepspeed synchronises gradients with DeepSpeed's own collectives; "
                             f"precision.grad_comm={self.precision.grad_comm!r} is not allowed with it; allowed: native")
        if self.train.compile and self.faults.nonfinite_step is not None and self.faults.nonfinite_where != "loss":
            # the fault is a hook on a layer inside a block; compiled code does not see hooks added later
            raise ValueError(f"faults.nonfinite_where={self.faults.nonfinite_where!r} poisons a gradient inside a "
                             "transformer block, which train.compile=true compiles without it; allowed with "
                             "train.compile=true: faults.nonfinite_where=loss")
        if strategy in ("zero1", "zero2") and self.precision.grad_comm != "fp8":
            raise ValueError(f"parallel={strategy} synchronises gradients in FP8 and needs precision.grad_comm='fp8' "
                             f"(precision={self.precision.name} has {self.precision.grad_comm!r}); allowed "
                             "precision with zero: fp8_o1, fp8_o2, fp8_o3")

    @property
    def strategy(self) -> str:
        """parallel.strategy with "auto" resolved."""
        if self.parallel.strategy != "auto":
            return self.parallel.strategy
        return "zero2" if self.precision.fp8_weights else "ddp"

    @property
    def block_size(self) -> int:
        return self.model.spec.block_size

    @property
    def vocab_size(self) -> int:
        return self.model.spec.vocab_size


def _model_from_mapping(data: Any) -> ModelConfig:
    if data is None or isinstance(data, ModelConfig):
        return data or ModelConfig()
    if not isinstance(data, Mapping):
        raise ConfigError(f"model={data!r} has the wrong type; expected a mapping")
    rest = dict(data)
    name, arch = rest.pop("name", "model"), rest.pop("arch", None)
    if arch not in ARCHS:
        raise ConfigError(f"model.arch={arch!r} is not allowed; allowed values: {', '.join(map(repr, ARCHS))}")
    try:
        spec = build_dataclass(ARCHS[arch], rest, "model")
    except ConfigError as e:
        if "unknown config key" in str(e):  # the YAML form also allows name and arch
            raise ConfigError(str(e).replace("under model: ", f"under model (arch {arch}): name, arch, ")) from None
        raise
    return ModelConfig(name=str(name), spec=spec)


def train_config_from_mapping(data: Mapping[str, Any]) -> TrainConfig:
    """A ``TrainConfig`` from a plain nested mapping (e.g. a composed Hydra config as a container).
    ConfigError (one line, naming the key and what is allowed) for anything invalid."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"the config is a {type(data).__name__}; expected a mapping")
    rest = dict(data)
    model = _model_from_mapping(rest.pop("model", None))
    return build_dataclass(TrainConfig, rest, "", prebuilt={"model": model})


def train_config_to_mapping(cfg: TrainConfig) -> dict[str, Any]:
    """The inverse of ``train_config_from_mapping`` (what run_dir/config.yaml holds)."""
    out = to_plain(cfg)
    out["model"] = {"name": cfg.model.name, "arch": cfg.model.arch, **to_plain(cfg.model.spec)}
    return out


def unknown_key_message(dotted_key: str) -> str | None:
    """None if ``dotted_key`` (e.g. "optim.lr") names a TrainConfig field, else the one-line error
    ``train_config_from_mapping`` would give. Model keys are checked against every architecture
    (which one applies is known only after composition); mappings (model.config) take any key."""
    parts = dotted_key.split(".")
    if parts[0] == "model":
        if len(parts) == 1 or parts[1] == "config":
            return None
        allowed = ["name", "arch", *dict.fromkeys(f for cls in ARCHS.values() for f in cls.__dataclass_fields__)]
        if parts[1] in allowed and len(parts) == 2:
            return None
        return f"unknown config key {dotted_key!r}; allowed keys under model: {', '.join(allowed)}"
    cls: Any = TrainConfig
    for depth, part in enumerate(parts):
        fields = {f: t for f, t in typing.get_type_hints(cls).items() if f in cls.__dataclass_fields__}
        if part not in fields:
            where = ".".join(parts[:depth])
            return (f"unknown config key {dotted_key!r}; allowed keys{' under ' + where if where else ''}: "
                    + ", ".join(fields))
        cls = fields[part]
        if not dataclasses.is_dataclass(cls):
            return None if depth == len(parts) - 1 or typing.get_origin(cls) is dict else \
                f"unknown config key {dotted_key!r}: {'.'.join(parts[:depth + 1])} has no sub-keys"
    return None
