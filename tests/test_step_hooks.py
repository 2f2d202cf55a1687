"""The loop's declared interfaces: both strategies satisfy the ``Strategy`` protocol; the loop
drives ONE list of step hooks (fault injection and FP8 statistics are its first members) in list
order, at fixed points of the step, and reports what they return; the fault hook changes the loss
only on the rank, step and micro-step it was configured for."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_utils import run_workers
from trainer_utils import tiny_config, tiny_strategy
from fp8train.trainer.faults import Faults, FaultsConfig
from fp8train.trainer.hooks import StepHook
from fp8train.trainer.strategy import Strategy

STEPS, ACCUM, CKPT_EVERY = 4, 2, 2


def _strategy_worker(rank: int, world: int, name: str) -> dict[str, bool]:
    _, strategy = tiny_strategy(rank, world, {"gemm": "fp8", "grad_comm": "fp8", "optimizer": "fp8_adamw"},
                                parallel={"strategy": name})
    return {"is_strategy": isinstance(strategy, Strategy)}


@pytest.mark.parametrize("name", ["ddp", "zero1", "zero2"])
def test_both_strategies_satisfy_the_strategy_protocol(name):
    assert run_workers(_strategy_worker, 2, name, timeout_s=90) == [{"is_strategy": True}] * 2


def test_an_object_without_the_strategy_methods_is_not_a_strategy():
    class _SaveOnly:  # what a checkpoint test stub offers: save/load, no step
        def save(self, directory: Path) -> None: ...

        def load(self, directory: Path) -> None: ...

    assert not isinstance(_SaveOnly(), Strategy)


class _ZeroLoss(StepHook):
    """Replaces every micro-step's loss by 0 (so the gradients, the norm and the logged loss are 0)."""

    def on_loss(self, step, micro, loss, *, last):
        return loss * 0.0


class _Recorder(StepHook):
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.intervals = 0

    def on_step_start(self, step):
        self.calls.append(("start", step))

    @contextlib.contextmanager
    def _context(self, step, micro):
        self.calls.append(("enter", step, micro))
        yield
        self.calls.append(("exit", step, micro))

    def micro_step_context(self, step, micro, *, last):
        return self._context(step, micro)

    def on_loss(self, step, micro, loss, *, last):
        self.calls.append(("loss", step, micro, last, float(loss.detach())))  # the loss the hook before returned
        return loss

    def before_commit(self, step):
        self.calls.append(("commit", step))

    def after_step(self, step, outcome):
        self.calls.append(("after", step))
        return {"test/step": float(step), "test/skipped": float(outcome.skipped)}

    def interval_metrics(self):
        self.intervals += 1
        return {"test/intervals": float(self.intervals)}


def _loop_worker(rank: int, world: int, cfg, run_dir: str) -> dict:
    from fp8train.trainer.build import build_model
    from fp8train.trainer.data import WindowSampler
    from fp8train.trainer.distributed import DistEnv
    from fp8train.trainer.loop import LoopState, run_loop
    from fp8train.trainer.precision import apply_precision
    from fp8train.trainer.run_log import RunLog, read_metrics
    from fp8train.trainer.strategy import build_strategy

    env = DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world, device=torch.device("cpu"))
    model = build_model(cfg.model, seed=cfg.seed, device=env.device)
    forward_ctx = apply_precision(model, cfg.precision, env.device)
    strategy = build_strategy(model, cfg, env)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 8192).astype(np.uint16)
    sampler = WindowSampler(tokens[:6000], seq_len=cfg.block_size, seed=0)
    run_log = RunLog(cfg.logging, run_dir=Path(run_dir), run_name="t", config={}, is_main=rank == 0,
                      start_step=0, total_steps=cfg.train.steps, wandb_id=None)
    run_log.open_metrics("t")
    recorder = _Recorder()
    try:
        state = run_loop(cfg, model=model, strategy=strategy, sampler=sampler, val_tokens=tokens[6000:], env=env,
                         run_log=run_log, state=LoopState(), run_dir=Path(run_dir), forward_ctx_factory=forward_ctx,
                         trainer_state=lambda s: {"data_position": sampler.position}, hooks=[_ZeroLoss(), recorder])
    finally:
        run_log.close()
    return {"calls": recorder.calls, "step": state.step, "metrics": read_metrics(run_dir) if rank == 0 else None}


def _expected_calls() -> list[tuple]:
    calls: list[tuple] = []
    for step in range(1, STEPS + 1):
        calls.append(("start", step))
        for micro in range(ACCUM):
            calls += [("enter", step, micro), ("loss", step, micro, micro == ACCUM - 1, 0.0), ("exit", step, micro)]
        calls.append(("after", step))
        if step % CKPT_EVERY == 0:
            calls.append(("commit", step))
    return calls


def test_loop_drives_the_hook_list_in_order_and_reports_what_hooks_return(tmp_path):
    cfg = tiny_config(tmp_path / "run", "precision=fp32", f"train.steps={STEPS}", f"train.grad_accum_steps={ACCUM}",
                      f"checkpoint.every={CKPT_EVERY}", "logging.log_every=2", "monitor.every=0", "parallel=ddp")
    (tmp_path / "run").mkdir()
    out = run_workers(_loop_worker, 2, cfg, str(tmp_path / "run"), timeout_s=120)
    for rank in out:
        assert rank["step"] == STEPS
        # every hook point, in the step's order; the recorder sees the loss _ZeroLoss (listed first) returned
        assert rank["calls"] == _expected_calls()
    records: dict[int, dict] = {}
    for record in out[0]["metrics"]:  # a step's records (the log line, val/loss) merged
        records.setdefault(record["step"], {}).update(record)
    assert sorted(records) == list(range(1, STEPS + 1))  # after_step metrics: a record at every step
    for step, record in records.items():
        assert record["test/step"] == step and record["test/skipped"] == 0.0
    for n, step in enumerate((2, 4), start=1):  # log steps: the loss the hooks returned, interval metrics
        assert records[step]["train/loss"] == 0.0 and records[step]["train/grad_norm"] == 0.0
        assert records[step]["test/intervals"] == n
    assert "train/loss" not in records[1] and "test/intervals" not in records[1]


# (rank, step, micro, last, expected factor): the fault is nonfinite_step=3 on rank 1, last micro-step
LOSS_FAULT_CASES = [
    pytest.param(1, 3, 1, True, "value", id="fires"),
    pytest.param(0, 3, 1, True, 1.0, id="other-rank"),
    pytest.param(1, 2, 1, True, 1.0, id="other-step"),
    pytest.param(1, 3, 0, False, 1.0, id="not-last-micro-step"),
]


@pytest.mark.parametrize("value", ["inf", "nan"])
@pytest.mark.parametrize(("rank", "step", "micro", "last", "factor"), LOSS_FAULT_CASES)
def test_loss_fault_hook_multiplies_only_the_chosen_micro_step(value, rank, step, micro, last, factor):
    faults = Faults(FaultsConfig(nonfinite_step=3, nonfinite_rank=1, nonfinite_value=value), rank, resumed=False,
                    model=torch.nn.Linear(2, 2))
    loss = torch.tensor(2.5)
    out = faults.on_loss(step, micro, loss, last=last)
    if factor == "value":
        assert math.isinf(float(out)) if value == "inf" else math.isnan(float(out))
    else:
        assert out is loss  # untouched: not even multiplied by 1 (bit-exact runs without faults)
