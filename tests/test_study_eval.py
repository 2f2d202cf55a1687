"""bench/study_eval.py: a finished run's checkpoint re-evaluated on the study's windows reproduces the loss the
trainer recorded, bit for bit; the windows are the trainer's; the report splits a gap's spread into the
evaluation's noise (half A against half B) and the rest, with the numbers its docstring promises."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_utils import tiny_config

from fp8train.trainer.data import validation_windows
from fp8train.trainer.run import train

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)  # it puts bench/ on sys.path for study and _timing ...
    finally:  # ... which must not stay there: bench/comm.py would shadow the top-level name "comm"
        sys.path[:] = saved
    return module


study_eval = _load("study_eval")


def test_batches_are_the_trainers_validation_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    ours = study_eval._batches(tokens, 0, 8, seq_len=16, batch_size=4)
    theirs = validation_windows(tokens, seq_len=16, batch_size=4, n_batches=2, rank=0, world_size=1)
    for (x, y), (tx, ty) in zip(ours, theirs, strict=True):
        assert torch.equal(x, tx) and torch.equal(y, ty)
    short = study_eval._batches(tokens, 5, 12, seq_len=16, batch_size=4)  # windows 5..11: batches of 4 and 3
    assert [len(x) for x, _ in short] == [4, 3]
    assert short[1][0][0, 0].item() == 9 * 16 and torch.equal(short[1][1], short[1][0] + 1)


@pytest.mark.parametrize("preset", ["bf16", "fp8_o2"])
def test_reevaluation_reproduces_the_recorded_loss(tmp_path, preset):
    run_dir = tmp_path / "run"
    result = train(tiny_config(run_dir, f"precision={preset}", "train.steps=4", "train.eval_every=4",
                               "checkpoint.every=4", "monitor.plots=false"))
    losses = study_eval.reevaluate(run_dir, max_windows=21)  # study windows 2 x 4 = 8; halves of 10
    assert losses["study windows"] == result.val_loss  # same weights, windows and batches: exactly
    assert losses["half A"] != losses["half B"]
    # the whole split is the two halves' window-weighted mean (equal halves: the plain mean)
    assert losses["whole split"] == pytest.approx((losses["half A"] + losses["half B"]) / 2, rel=1e-12)


def test_report_separates_evaluation_noise_from_the_trajectories():
    seeds = range(4)
    trajectory = [0.4, -0.2, 0.6, 0.0]  # the gap the whole split sees, % of bf16
    eval_noise = [0.3, -0.3, 0.1, -0.1]  # half A sees +noise, half B -noise
    bf16 = {s: {k: 2.0 for k in study_eval.SPLITS} for s in seeds}

    def fp8(s: int) -> dict[str, float]:
        g = {"whole split": trajectory[s], "half A": trajectory[s] + eval_noise[s],
             "half B": trajectory[s] - eval_noise[s], "recorded": 1.0, "study windows": 1.0}
        return {k: 2.0 * (1 + v / 100) for k, v in g.items()}

    lines = study_eval.report({"fp32": bf16, "bf16": bf16, "fp8_o2 tensor": {s: fp8(s) for s in seeds}}, "toy")
    (row,) = [line for line in lines if line.startswith("| fp8_o2 tensor")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    # half A - half B = 2 x noise, so SD(A - B) / 2 = SD(noise)
    assert float(cells[6]) == pytest.approx(statistics.stdev(eval_noise), abs=1e-3)
    mean, se = statistics.fmean(trajectory), statistics.stdev(trajectory) / 2
    assert cells[7] == f"{mean:+.3f} +- {se:.3f}" and cells[8] == "pass"  # +0.200 <= 0.25
    assert cells[3].startswith(f"{mean:+.3f} ")
