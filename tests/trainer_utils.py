"""Helpers for trainer tests: tiny configs, CLI subprocesses, metrics without timing fields."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from fp8train.trainer.config import TrainConfig, train_config_from_mapping
from fp8train.trainer.run_log import read_metrics

# wall-clock fields differ between any two runs; everything else must match bit for bit
TIMING_KEYS = ("train/tokens_per_s", "train/memory_mib", "train/monitor_s")


def tiny_config(run_dir: Path, *overrides: str) -> TrainConfig:
    """The ``smoke`` experiment (20 short steps of gpt_tiny) composed like the CLI does."""
    with initialize_config_module(config_module="fp8train.configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=smoke", "logging.progress=false",
                                                        f"run_dir={run_dir}", *overrides])
    return train_config_from_mapping(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))


def metrics_without_timing(run_dir: Path) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir)]


def cli_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ, WANDB_SILENT="true", OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(cache_dir))
    env.pop("WANDB_MODE", None)
    return env


def run_cli(args: list[str], cwd: Path, cache_dir: Path, *, torchrun_nproc: int | None = None,
            timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``fp8train ARGS`` (or ``torchrun --standalone --nproc-per-node=N -m fp8train ARGS``) in ``cwd``."""
    if torchrun_nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun_nproc}",
               "-m", "fp8train", *args]
    else:
        cmd = [sys.executable, "-m", "fp8train", *args]
    return subprocess.run(cmd, cwd=cwd, env=cli_env(cache_dir), capture_output=True, text=True, timeout=timeout)


def popen_cli(args: list[str], cwd: Path, cache_dir: Path) -> subprocess.Popen[str]:
    """Start ``python -m fp8train ARGS`` in ``cwd`` without waiting (tables of cases run at once)."""
    return subprocess.Popen([sys.executable, "-m", "fp8train", *args, f"data.cache_dir={cache_dir}"], cwd=cwd,
                            env=cli_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_one_line_error(returncode: int, stderr: str, message: str) -> None:
    """The CLI's contract for bad input: exit 2 and exactly one stderr line naming the problem."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("fp8train: error: "), stderr
    assert message in lines[0], lines[0]


def tiny_strategy(rank: int, world: int, precision: dict, **groups: dict):
    """(model, strategy) for a 1-layer GPT (width 32, block 16) on this rank of a gloo group that
    the caller set up; ``groups`` adds config groups, e.g. ``parallel={"strategy": "zero2"}``."""
    import torch

    from fp8train.trainer.precision import apply_precision
    from fp8train.trainer.build import build_model
    from fp8train.trainer.distributed import DistEnv
    from fp8train.trainer.strategy import build_strategy

    cfg = train_config_from_mapping({"model": {"arch": "gpt", "name": "t", "n_layer": 1, "n_embd": 32, "n_head": 2,
                                               "block_size": 16}, "precision": precision, **groups})
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world, device=torch.device("cpu"))
    model = build_model(cfg.model, seed=0, device=env.device)
    apply_precision(model, cfg.precision, env.device)
    strategy = build_strategy(model, cfg, env)
    strategy.set_lr(1e-2)
    return model, strategy
