"""No rank waits for another's error: when a step, the optimizer's construction or
a checkpoint save fails on ONE rank, every rank raises within seconds, instead of the healthy ranks
entering the next collective and waiting there for the process group's timeout.

2 gloo processes with a 60 s collective timeout; each case must raise on every rank within 30 s (a
rank left waiting would only raise at 60 s, from gloo), the failing rank with its own error and the
others with a RuntimeError naming the failing rank."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import fp8train.trainer.strategy as strategy_module
from dist_utils import run_workers
from fp8train.comm import Fp8CommConfig, ZeroConfig, ZeroOptimizer
from fp8train.optim import Fp8AdamW
from fp8train.trainer.precision import apply_precision
from fp8train.trainer.build import build_model
from fp8train.trainer.checkpoint import save_checkpoint
from fp8train.trainer.config import train_config_from_mapping
from fp8train.trainer.distributed import DistEnv
from fp8train.trainer.strategy import build_strategy

COLLECTIVE_TIMEOUT_S = 60.0
MUST_RAISE_WITHIN_S = 30.0  # half the group's timeout: a rank that waited for it cannot pass
FAILING_RANK = 1
MISSING = "h.0.mlp.c_fc.weight"
PRESET = {"gemm": "fp32", "grad_comm": "fp8", "optimizer": "fp8_adamw"}


def _cfg(strategy: str):
    return train_config_from_mapping({"model": {"arch": "gpt", "name": "t", "n_layer": 1, "n_embd": 32, "n_head": 2,
                                                "block_size": 16}, "precision": PRESET,
                                      "parallel": {"strategy": strategy}})


def _model_and_env(rank: int, world: int, cfg):
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world, device=torch.device("cpu"))
    model = build_model(cfg.model, seed=0, device=env.device)
    apply_precision(model, cfg.precision, env.device)
    return model, env


def _backward(module: torch.nn.Module, rank: int) -> None:
    x = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(rank))
    module(x, x)[1].backward()


# ---- the cases: each runs on every rank and fails on one -----------------------------------------

def _zero_missing_gradient(rank: int, world: int, stage: int) -> None:
    model, _ = _model_and_env(rank, world, _cfg("ddp"))
    zero = ZeroOptimizer(model.named_parameters(), lambda owned: Fp8AdamW(owned, lr=1e-3),
                         config=ZeroConfig(stage=stage, comm=Fp8CommConfig()))
    _backward(model, rank)
    if rank == FAILING_RANK:
        dict(model.named_parameters())[MISSING].grad = None  # e.g. a layer this rank's batch skipped
    zero.step()


def _zero_factory_fails(rank: int, world: int) -> None:
    model, _ = _model_and_env(rank, world, _cfg("ddp"))

    def factory(owned: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if rank == FAILING_RANK:
            raise MemoryError("cannot allocate the optimizer state")
        return Fp8AdamW(owned, lr=1e-3)

    ZeroOptimizer(model.named_parameters(), factory, config=ZeroConfig())


def _failing_build_optimizer(params, cfg, **kwargs):
    raise MemoryError("cannot allocate the optimizer state")


def _ddp_build_optimizer_fails(rank: int, world: int) -> None:
    cfg = _cfg("ddp")
    model, env = _model_and_env(rank, world, cfg)
    if rank == FAILING_RANK:  # test-side stand-in for an allocation failure on one rank
        strategy_module.build_optimizer = _failing_build_optimizer
    build_strategy(model, cfg, env)


def _disk_full(obj, path):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _ddp_save_fails_on_rank0(rank: int, world: int, run_dir: str) -> None:
    cfg = _cfg("ddp")
    model, env = _model_and_env(rank, world, cfg)
    strategy = build_strategy(model, cfg, env)
    if rank == 0:  # rank 0 is the one that writes the replicated model and optimizer
        strategy_module.atomic_torch_save = _disk_full
    save_checkpoint(Path(run_dir), 1, strategy=strategy, model=model, env=env, trainer_state={}, keep_last=1)


def _timed(rank: int, world: int, barrier, case: str, *args) -> dict:
    """Run ``case`` and time its error. Then wait for the other ranks to finish theirs, as a failing
    process does while its error propagates (under a launcher, until it is torn down): a rank that
    exited at once would close its connections and wake up a waiting peer at once."""
    fn = {"zero_missing_gradient": _zero_missing_gradient, "zero_factory_fails": _zero_factory_fails,
          "ddp_build_optimizer_fails": _ddp_build_optimizer_fails,
          "ddp_save_fails_on_rank0": _ddp_save_fails_on_rank0}[case]
    t0 = time.monotonic()
    try:
        fn(rank, world, *args)
    except Exception as e:  # the verdict is checked in the test process
        out = {"error": type(e).__name__, "message": str(e), "seconds": time.monotonic() - t0}
    else:
        out = {"error": None, "message": "", "seconds": time.monotonic() - t0}
    try:
        barrier.wait(timeout=MUST_RAISE_WITHIN_S + 10)
    except threading.BrokenBarrierError:
        pass  # a peer is still stuck: its time tells
    return out


# (case, args, the failing rank's own error and message, what the other rank's RuntimeError names)
CASES = {
    "zero1_missing_gradient": ("zero_missing_gradient", (1,), FAILING_RANK, "RuntimeError", MISSING,
                               "without a gradient on rank(s) [1]"),
    "zero2_missing_gradient": ("zero_missing_gradient", (2,), FAILING_RANK, "RuntimeError", MISSING,
                               "without a gradient on rank(s) [1]"),
    "zero_optimizer_factory_fails": ("zero_factory_fails", (), FAILING_RANK, "MemoryError", "optimizer state",
                                     "optimizer_factory failed on rank(s) [1]"),
    "ddp_build_optimizer_fails": ("ddp_build_optimizer_fails", (), FAILING_RANK, "MemoryError", "optimizer state",
                                  "failed on rank(s) [1]"),
    "ddp_save_fails_on_rank0": ("ddp_save_fails_on_rank0", ("RUN_DIR",), 0, "OSError", "No space left",
                                "failed on rank(s) [0]"),
}


@pytest.mark.parametrize("name", CASES, ids=CASES)
def test_every_rank_raises_promptly_when_one_fails(name, tmp_path):
    case, args, failing, own_error, own_message, others_message = CASES[name]
    args = tuple(str(tmp_path) if a == "RUN_DIR" else a for a in args)
    barrier = mp.get_context("spawn").Barrier(2)
    out = run_workers(_timed, 2, barrier, case, *args, timeout_s=COLLECTIVE_TIMEOUT_S + 60,
                      collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    for rank, res in enumerate(out):
        assert res["error"] is not None, f"rank {rank} did not raise"
        assert res["seconds"] < MUST_RAISE_WITHIN_S, f"rank {rank} raised only after {res['seconds']:.0f} s: {res}"
        if rank == failing:
            assert res["error"] == own_error and own_message in res["message"], res
        else:
            assert res["error"] == "RuntimeError" and others_message in res["message"], res
