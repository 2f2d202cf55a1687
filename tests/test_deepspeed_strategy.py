"""parallel=deepspeed (fp8train/trainer/deepspeed_strategy.py) on 2 gloo ranks, through the Strategy
protocol the loop calls (accumulating / backward / step / zero_grad / save / load): ZeRO-1 and ZeRO-3
train like DDP (both fp8_o2 with native gradient communication), an inf/NaN gradient on one rank skips
the step on every rank at every stage, checkpoints resume bit for bit (and refuse another world size in
one line), and the config errors of impossible combinations. The parity and checkpoint runs, and the
CLI runs (a rank killed mid-way and restarted by torchrun; a resume at another world size), are
reliability tests (``make test-reliability``, run by CI after the default suite)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import sqnr_db
from dist_utils import run_workers
from synthetic import MarkovTokens
from trainer_utils import assert_one_line_error, cli_env, metrics_without_timing, run_cli, tiny_strategy

# DeepSpeed is imported only in the worker processes: the pytest process stays free of its import
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed (dev extra)")

# fp8_o2 with precision.grad_comm=native (DeepSpeed's collectives are its own)
PRECISION = {"gemm": "fp8", "grad_comm": "native", "optimizer": "fp8_adamw"}
ACCUM, MICRO_BATCH, STEPS, LR = 2, 4, 20, 1e-2
LOOP = {"grad_accum_steps": ACCUM, "micro_batch_size": MICRO_BATCH}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _deepspeed(stage: int) -> dict:
    return {"strategy": "deepspeed", "deepspeed_stage": stage}


def _full_params(model: torch.nn.Module, stage: int) -> list[torch.Tensor]:
    """Every parameter in full (ZeRO-3 keeps only a partition: gathered, a collective)."""
    if stage != 3:
        return [p.detach().clone() for p in model.parameters()]
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def _train(model, strategy, rank: int, steps: int, *, first_step: int = 0) -> list[float]:
    """The loop's micro-steps (fp8train/trainer/loop.py) on Markov tokens; this rank's losses."""
    data = MarkovTokens(256, 16, seed=0)
    losses = []
    for step in range(first_step, first_step + steps):
        strategy.set_lr(LR)
        gen = torch.Generator().manual_seed(1000 * step + rank)  # a rank's batch depends only on the step
        total = 0.0
        for micro in range(ACCUM):
            x, y = data.batch(MICRO_BATCH, gen)
            with strategy.accumulating(sync=micro == ACCUM - 1):
                _, loss = strategy.module(x, y)
                strategy.backward(loss / ACCUM)
            total += float(loss.detach())
        outcome = strategy.step()
        strategy.zero_grad()
        assert not outcome.skipped and outcome.grad_norm is not None and outcome.comm_bytes > 0, outcome
        losses.append(total / ACCUM)
    return losses


def _parity_worker(rank: int, world: int) -> dict:
    runs = {}
    for name, parallel in (("ddp", {"strategy": "ddp"}), ("zero1", _deepspeed(1)), ("zero3", _deepspeed(3))):
        t0 = time.perf_counter()
        model, strategy = tiny_strategy(rank, world, PRECISION, parallel=parallel, train=LOOP)
        losses = _train(model, strategy, rank, STEPS)
        stage = parallel.get("deepspeed_stage", 0)
        runs[name] = {"losses": losses, "params": _full_params(model, stage), "seconds": time.perf_counter() - t0,
                      "engine": type(getattr(strategy, "engine", None)).__name__,
                      "client": type(strategy.local_optimizer).__name__}
    return runs


@pytest.fixture(scope="module")
def parity_runs() -> list[dict]:
    return run_workers(_parity_worker, 2, timeout_s=180)


# Tolerance (SQNR tier): both runs cast the same tensors to FP8 with the same recipe, so their first
# losses are equal; they part only where fp32 sums run in another order (DeepSpeed divides after its
# all-reduce, DDP before) and, at ZeRO 1-3, where Fp8AdamW scales a flat partition instead of each
# tensor (another E4M3 rounding of m: 3 mantissa bits). FP8 rounding carries those differences on step
# after step: measured 64-68 dB over 20 steps. 55 dB (0.18 % rms of the loss) leaves room for that
# and still fails a broken reduction (a rank's gradient lost or counted twice moves every update by
# tens of percent: losses part by ~1 %, ~40 dB).
LOSS_SQNR_FLOOR_DB = 55.0


@pytest.mark.reliability  # three 20-step runs on 2 ranks (~40 s): kept out of the default suite's time budget
@pytest.mark.parametrize("run", ["zero1", "zero3"])
def test_deepspeed_trains_like_ddp_and_keeps_the_ranks_identical(parity_runs, run):
    for rank, runs in enumerate(parity_runs):
        assert runs[run]["engine"] == "DeepSpeedEngine" and runs[run]["client"] == "Fp8AdamW"
        ddp, ours = torch.tensor(runs["ddp"]["losses"]), torch.tensor(runs[run]["losses"])
        assert ddp[-5:].mean() < ddp[0] - 0.2 and ours[-5:].mean() < ours[0] - 0.2  # they learn
        assert sqnr_db(ddp, ours) >= LOSS_SQNR_FLOOR_DB, (rank, ddp.tolist(), ours.tolist())
        assert runs[run]["seconds"] < 60  # DeepSpeed compiled nothing (a C++ op build takes minutes)
    # bit-exact across ranks: every rank applies the same update to the same weights
    for a, b in zip(parity_runs[0][run]["params"], parity_runs[1][run]["params"]):
        assert torch.equal(a, b)


def _optimizer_state(strategy) -> list[torch.Tensor]:
    return [v.clone() for s in strategy.local_optimizer.state.values() for v in s.values() if torch.is_tensor(v)]


def _overflow_case(rank: int, world: int, stage: int, optimizer: str) -> dict:
    model, strategy = tiny_strategy(rank, world, {**PRECISION, "optimizer": optimizer}, parallel=_deepspeed(stage),
                                    train={"grad_accum_steps": 1})
    x = torch.randint(256, (4, 16), generator=torch.Generator().manual_seed(100 + rank))

    def step(poison: bool):
        with strategy.accumulating(sync=True):
            _, loss = strategy.module(x, x)
            strategy.backward(loss * (float("nan") if poison else 1.0))
        outcome = strategy.step()
        strategy.zero_grad()
        return outcome

    first = step(poison=False)
    weights, state = _full_params(model, stage), _optimizer_state(strategy)
    poisoned = step(poison=rank == 1)  # NaN gradients on rank 1 only
    after = _full_params(model, stage)
    unchanged = all(torch.equal(a, b) for a, b in zip(weights, after)) and \
        all(torch.equal(a, b) for a, b in zip(state, _optimizer_state(strategy)))
    third = step(poison=False)  # and it trains on
    return {"first": first, "poisoned": poisoned, "third": third, "unchanged": unchanged, "weights": after,
            "moved": not all(torch.equal(a, b) for a, b in zip(after, _full_params(model, stage)))}


# (stage, optimizer); torch AdamW checks nothing itself, Fp8AdamW skips a step whose gradients it sees
# non-finite (at stage 0 every rank sees the same all-reduced NaN; at 1-3 only the owner of the NaN)
OVERFLOW_CASES = [(0, "adamw"), (0, "fp8_adamw"), (1, "fp8_adamw"), (2, "fp8_adamw"), (3, "fp8_adamw"), (3, "adamw")]


def _overflow_worker(rank: int, world: int) -> dict:
    return {case: _overflow_case(rank, world, *case) for case in OVERFLOW_CASES}  # one spawn for all


@pytest.fixture(scope="module")
def overflow_runs() -> list[dict]:
    return run_workers(_overflow_worker, 2, timeout_s=180)


@pytest.mark.parametrize("case", OVERFLOW_CASES, ids=[f"zero{s}-{o}" for s, o in OVERFLOW_CASES])
def test_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(overflow_runs, case):
    out = [runs[case] for runs in overflow_runs]
    for r in out:
        assert not r["first"].skipped and r["first"].grad_norm is not None
        assert r["poisoned"].skipped and r["poisoned"].grad_norm is None, r["poisoned"]
        assert r["unchanged"]  # weights and optimizer state bit-identical to before the poisoned step
        assert not r["third"].skipped and r["moved"]
    for a, b in zip(out[0]["weights"], out[1]["weights"]):
        assert torch.equal(a, b)


def _resume_case(rank: int, world: int, stage: int, path: Path) -> dict:
    from fp8train.errors import ConfigError

    model, strategy = tiny_strategy(rank, world, PRECISION, parallel=_deepspeed(stage), train=LOOP)
    _train(model, strategy, rank, 3)
    if rank == 0:
        path.mkdir()
    torch.distributed.barrier()
    strategy.save(path)
    straight = _train(model, strategy, rank, 3, first_step=3)
    straight_params = _full_params(model, stage)

    model, strategy = tiny_strategy(rank, world, PRECISION, parallel=_deepspeed(stage), train=LOOP)
    strategy.load(path)
    resumed = _train(model, strategy, rank, 3, first_step=3)
    same_params = all(torch.equal(a, b) for a, b in zip(straight_params, _full_params(model, stage)))

    torch.distributed.barrier()
    if rank == 0:  # as if saved by 4 processes
        manifest = json.loads((path / "deepspeed.json").read_text())
        (path / "deepspeed.json").write_text(json.dumps({**manifest, "world_size": 4}))
    torch.distributed.barrier()
    try:
        strategy.load(path)
        error = None
    except ConfigError as e:
        error = str(e)
    return {"straight": straight, "resumed": resumed, "same_params": same_params, "error": error}


RESUME_STAGES = [0, 2, 3]  # stage 1 saves what stage 2 does


def _resume_worker(rank: int, world: int, directory: str) -> dict:
    return {stage: _resume_case(rank, world, stage, Path(directory) / f"zero{stage}") for stage in RESUME_STAGES}


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory) -> list[dict]:
    return run_workers(_resume_worker, 2, str(tmp_path_factory.mktemp("deepspeed_ckpt")), timeout_s=180)


@pytest.mark.reliability  # save + load at three stages on 2 ranks (~25 s)
@pytest.mark.parametrize("stage", RESUME_STAGES)
def test_checkpoint_resumes_bit_for_bit_and_refuses_another_world_size(resume_runs, stage):
    for r in (runs[stage] for runs in resume_runs):
        assert r["resumed"] == r["straight"]  # every loss, exactly
        assert r["same_params"]
        assert r["error"] is not None and "\n" not in r["error"], r["error"]
        assert f"DeepSpeed ZeRO-{stage} checkpoint of 4 processes, this run ZeRO-{stage} on 2" in r["error"]


CONFIG_ERRORS = [  # (overrides, message): combinations DeepSpeed cannot run
    pytest.param(("precision=fp8_o2",), "precision.grad_comm='fp8' is not allowed with it; allowed: native",
                 id="fp8-grad-comm"),
    pytest.param(("precision=fp8_o3",), "needs parallel zero1, zero2 or fsdp2 (got deepspeed)", id="fp8-weights"),
]


@pytest.mark.parametrize(("overrides", "message"), CONFIG_ERRORS)
def test_impossible_combinations_are_one_line_errors(tmp_path, cache_dir, overrides, message):
    proc = run_cli(["experiment=smoke", "parallel=deepspeed", *overrides, f"hydra.run.dir={tmp_path / 'run'}",
                    f"data.cache_dir={cache_dir}"], tmp_path, cache_dir)
    assert_one_line_error(proc.returncode, proc.stderr, message)
    assert not (tmp_path / "run" / "checkpoints").exists()


# the smoke experiment (gpt_tiny, 20 steps) under DeepSpeed ZeRO-2 on 2 processes, every step logged
CLI = ("experiment=smoke", "logging.progress=false", "logging.log_every=1", "monitor.plots=false",
       "launcher.cpu_threads=1", "parallel=deepspeed", "parallel.deepspeed_stage=2", "precision=fp8_o2",
       "precision.grad_comm=native", "checkpoint.every=5")


@pytest.mark.reliability
def test_killed_rank_is_restarted_and_resumes_to_the_same_metrics(tmp_path, cache_dir):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run_cli([*CLI, f"data.cache_dir={cache_dir}", f"hydra.run.dir={straight}"], tmp_path, cache_dir,
                   torchrun_nproc=2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "fp8train", *CLI, f"data.cache_dir={cache_dir}", f"hydra.run.dir={killed}",
           "faults.kill_step=13", "faults.kill_rank=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(cache_dir), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "faults: killing rank 1 at the start of step 13" in proc.stdout
    assert "resumed from" in proc.stdout and "step_00000010" in proc.stdout
    files = {p.name for p in (killed / "checkpoints/step_00000020").iterdir()}
    assert {"deepspeed", "deepspeed.json", "rank0.pt", "rank1.pt", "trainer.json"} <= files
    # every record (losses, lr, grad norms, skips, val losses) equals the uninterrupted run's, exactly
    assert metrics_without_timing(killed) == metrics_without_timing(straight)


@pytest.mark.reliability
def test_resume_at_another_world_size_is_a_one_line_error(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = [*CLI, "checkpoint.every=2", f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    proc = run_cli([*args, "train.steps=4"], tmp_path, cache_dir, torchrun_nproc=2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    proc = run_cli([*args, "train.steps=6"], tmp_path, cache_dir)  # one process, resume=auto
    assert_one_line_error(proc.returncode, proc.stderr, "a DeepSpeed ZeRO-2 checkpoint of 2 processes, this run "
                          "ZeRO-2 on 1; allowed: parallel.deepspeed_stage=2 on 2 processes")
