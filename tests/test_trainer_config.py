"""The Hydra config tree composes, every option becomes a typed TrainConfig, and bad configs fail
with one line naming the key (in-process: fp8train.trainer.config; the CLI's exit codes are in
test_cli.py)."""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from fp8train.errors import ConfigError
from fp8train.trainer.cli import group_options
from fp8train.models.gpt import GPTConfig
from fp8train.models.llama import LlamaConfig
from fp8train.trainer.config import (
    HfModelConfig,
    OptimConfig,
    TrainConfig,
    train_config_from_mapping,
    train_config_to_mapping,
)
from fp8train.trainer.schedule import lr_at

GROUPS = ("model", "data", "precision", "optim", "parallel", "logging", "launcher", "experiment")
REQUIRED = {"data/custom": ["data.path=/tmp/corpus.txt"]}  # options with a mandatory field


def _compose(overrides: list[str]) -> TrainConfig:
    with initialize_config_module(config_module="fp8train.configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "run_dir=outputs/x"])
    return train_config_from_mapping(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))


def test_every_group_has_the_options_the_docs_name():
    assert set(group_options("model")) == {"gpt_tiny", "gpt_small", "llama_tiny", "llama_small", "llama_1b", "hf"}
    assert set(group_options("precision")) == {"fp32", "bf16", "fp8_o1", "fp8_o2", "fp8_o3"}
    assert set(group_options("parallel")) == {"auto", "ddp", "zero1", "zero2", "fsdp2", "deepspeed"}
    assert set(group_options("logging")) == {"wandb_offline", "wandb_disabled", "wandb_online"}
    assert group_options("experiment")


@pytest.mark.parametrize("group_option", [f"{g}/{o}" for g in GROUPS for o in group_options(g)])
def test_every_option_composes_into_a_typed_config(group_option):
    group, option = group_option.split("/")
    extra = REQUIRED.get(group_option, [])
    if group == "parallel" and option in ("zero1", "zero2"):
        extra.append("precision=fp8_o1")  # zero needs FP8 gradient communication
    if group == "parallel" and option == "deepspeed":
        extra.append("precision.grad_comm=native")  # DeepSpeed's own collectives
    cfg = _compose([f"{group}={option}", *extra])
    if group == "experiment":
        return  # composing and validating is the test
    section = cfg.model.name if group == "model" else getattr(cfg, group)
    if group == "model":
        assert section == option
    elif group == "parallel":
        assert cfg.parallel.strategy == option
    elif hasattr(section, "name"):
        assert section.name == option
    assert train_config_from_mapping(train_config_to_mapping(cfg)) == cfg  # config.yaml round-trips


def test_default_config_is_the_documented_one():
    cfg = _compose([])
    assert (cfg.model.arch, cfg.precision.name, cfg.strategy, cfg.data.path) == ("gpt", "fp8_o2", "ddp", None)
    assert cfg.name == "gpt_tiny-fp8_o2"
    assert isinstance(cfg.model.spec, GPTConfig)


def test_precision_presets_add_up():
    levels = {p: _compose([f"precision={p}"]) for p in ("fp32", "bf16", "fp8_o1", "fp8_o2", "fp8_o3")}
    got = {p: (c.precision.gemm, c.precision.grad_comm, c.precision.optimizer, c.precision.fp8_weights, c.strategy)
           for p, c in levels.items()}
    assert got == {
        "fp32": ("fp32", "native", "adamw", False, "ddp"),
        "bf16": ("bf16", "native", "adamw", False, "ddp"),
        "fp8_o1": ("fp8", "fp8", "adamw", False, "ddp"),
        "fp8_o2": ("fp8", "fp8", "fp8_adamw", False, "ddp"),
        "fp8_o3": ("fp8", "fp8", "fp8_adamw", True, "zero2"),
    }


def test_model_specs_by_arch():
    assert isinstance(_compose(["model=llama_tiny"]).model.spec, LlamaConfig)
    hf = _compose(["model=hf"]).model.spec
    assert isinstance(hf, HfModelConfig) and hf.config["_target_"] == "transformers.LlamaConfig"
    assert _compose(["model=llama_tiny", "model.n_kv_head=1"]).model.spec.n_kv_head == 1


BAD_CONFIGS = [
    ("unknown_key", {"optim": {"lrr": 1e-3}}, "unknown config key 'optim.lrr'; allowed keys under optim: lr,"),
    ("wrong_type", {"train": {"steps": "many"}}, "train.steps='many' has the wrong type; expected integer"),
    ("bool_for_number", {"optim": {"lr": True}}, "optim.lr=True has the wrong type"),
    ("bad_choice", {"precision": {"gemm": "fp4"}}, "precision.gemm='fp4' is not allowed; allowed values: 'fp32'"),
    ("nested_validation", {"precision": {"fp8": {"recipe": "magic"}}}, "precision.fp8: Fp8Config.recipe='magic'"),
    ("out_of_range", {"train": {"micro_batch_size": 0}}, "LoopConfig.micro_batch_size=0 is out of range"),
    ("unknown_arch", {"model": {"arch": "rnn"}}, "model.arch='rnn' is not allowed; allowed values: 'gpt'"),
    ("key_of_another_arch", {"model": {"arch": "gpt", "n_kv_head": 2}}, "allowed keys under model (arch gpt)"),
    ("zero_with_fp32_comm", {"parallel": {"strategy": "zero2"}, "precision": {"grad_comm": "native"}},
     "parallel=zero2 synchronises gradients in FP8"),
    ("fp8_weights_with_ddp", {"parallel": {"strategy": "ddp"}, "precision": {"fp8_weights": True}},
     "needs parallel zero1, zero2 or fsdp2"),
    ("fp8_weights_fsdp2_blocks", {"parallel": {"strategy": "fsdp2"},
                                  "precision": {"fp8_weights": True, "fp8": {"granularity": "block"}}},
     "precision.fp8.granularity='block' / recipe='current' with fp8_weights and parallel=fsdp2"),
    ("fp8_weights_fsdp2_delayed", {"parallel": {"strategy": "fsdp2"},
                                   "precision": {"fp8_weights": True, "fp8": {"recipe": "delayed"}}},
     "allowed: granularity=tensor with recipe=current"),
    ("fp8_weights_without_master", {"precision": {"fp8_weights": True, "optim_state": {"master_dtype": None}}},
     "needs optim_state.master_dtype"),
    ("bad_state_format", {"precision": {"optim_state": {"exp_avg_sq_dtype": "e4m3"}}}, "exp_avg_sq_dtype='e4m3'"),
    ("min_lr_above_lr", {"optim": {"lr": 1e-4, "min_lr": 1e-3}}, "min_lr=0.001 is above lr"),
    ("stop_after_beyond_steps", {"train": {"steps": 10, "stop_after": 11}}, "stop_after=11 is out of range"),
    ("model_shape", {"model": {"arch": "gpt", "n_embd": 100, "n_head": 3}}, "n_embd=100 must be divisible by n_head=3"),
]


@pytest.mark.parametrize("data, message", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        train_config_from_mapping(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_schedule_warmup_then_cosine_to_min_lr():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(10, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(99, cfg, 100) == pytest.approx(1e-4)
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), cfg, 100) == pytest.approx(1e-4 + 0.45e-3 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))
    lrs = [lr_at(s, cfg, 100) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
    const = OptimConfig(lr=1e-3, min_lr=1e-3, warmup_steps=0, schedule="constant")
    assert {lr_at(s, const, 50) for s in range(50)} == {1e-3}
