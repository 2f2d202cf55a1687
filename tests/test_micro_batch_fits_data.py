"""A micro-batch needs distinct windows: the whole job reads ``micro_batch_size x world_size`` windows
of the train split per micro-step (fp8train.trainer.data), so a larger request than the split holds is a
one-line config error, raised as soon as the data is loaded -- before the model or any batch is
allocated (a 100000-sequence micro-batch used to run for minutes before anything failed)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fp8train.errors import ConfigError
from fp8train.trainer.data import TokenData, WindowSampler, check_micro_batch, train_windows
from trainer_utils import assert_one_line_error, popen_cli

SMOKE = ["experiment=smoke", "train.steps=1", "logging.progress=false", "monitor.plots=false", "checkpoint.every=0"]
TEXT_4MB = (b"to be or not to be, that is the question\n" * 102400)[: 4 * 2**20]
# train split of 4 MiB with val_fraction 0.1: 3774874 tokens -> (3774874 - 128) // 128 windows
WINDOWS_4MB_BLOCK_128 = 29490


def _data(n_train_tokens: int) -> TokenData:
    tokens = np.zeros(n_train_tokens + 200, dtype=np.uint8)
    return TokenData(train=tokens[:n_train_tokens], val=tokens[n_train_tokens:], source="test")


def test_window_count_is_the_samplers() -> None:
    for n_tokens, seq_len in ((1000, 64), (129, 64), (128 * 50 + 127, 128), (3774874, 128)):
        sampler = WindowSampler(np.zeros(n_tokens, dtype=np.uint8), seq_len=seq_len, seed=0)
        assert train_windows(n_tokens, seq_len) == sampler.n_windows
    assert train_windows(3774874, 128) == WINDOWS_4MB_BLOCK_128


# (id, train tokens, seq_len, world_size, largest micro-batch that fits)
LIMITS = [
    ("one_process", 64 * 11, 64, 1, 10),
    ("two_processes_even", 64 * 11, 64, 2, 5),
    ("two_processes_odd", 64 * 12, 64, 2, 5),   # 11 windows: 2 x 6 would repeat a window
    ("one_window", 129, 64, 1, 1),
]


@pytest.mark.parametrize("n_tokens, seq_len, world_size, most", [c[1:] for c in LIMITS], ids=[c[0] for c in LIMITS])
def test_micro_batch_limit_is_the_windows_per_process(n_tokens, seq_len, world_size, most) -> None:
    data = _data(n_tokens)
    check_micro_batch(data, seq_len=seq_len, micro_batch_size=most, world_size=world_size)
    with pytest.raises(ConfigError) as err:
        check_micro_batch(data, seq_len=seq_len, micro_batch_size=most + 1, world_size=world_size)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert f"train.micro_batch_size={most + 1}" in message and f"allowed: train.micro_batch_size in [1, {most}]" in message


def test_more_processes_than_windows_is_an_error_too() -> None:
    with pytest.raises(ConfigError, match=r"holds 2 windows .* allowed: at most 2 processes"):
        check_micro_batch(_data(64 * 3), seq_len=64, micro_batch_size=1, world_size=3)


# (id, file contents, extra args, text the error line must contain)
CLI_CASES = [
    # the reported case: llama_tiny, a 4 MB text, micro_batch_size=100000
    ("huge_micro_batch", TEXT_4MB, ["model=llama_tiny", "model.block_size=128", "train.micro_batch_size=100000"],
     f"train.micro_batch_size=100000 on 1 process(es) needs 100000 windows per micro-step, but the train split "
     f"holds {WINDOWS_4MB_BLOCK_128} windows"),
    # one window too many: 16 KiB, block 64 -> 14746 train tokens, 229 windows (cheap to run even when unchecked)
    ("one_too_many", TEXT_4MB[: 16 * 1024], ["train.micro_batch_size=230"], "allowed: train.micro_batch_size in [1, 229]"),
]


@pytest.mark.parametrize("data, args, message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_micro_batch_beyond_the_data_fails_fast_in_one_line(tmp_path: Path, data, args, message) -> None:
    (tmp_path / "corpus.txt").write_bytes(data)
    started = time.monotonic()
    proc = popen_cli([*SMOKE, "data=custom", "data.path=corpus.txt", *args], tmp_path, tmp_path / "cache")
    _, stderr = proc.communicate(timeout=60)  # it used to be still running after 2 minutes
    assert_one_line_error(proc.returncode, stderr, message)
    assert time.monotonic() - started < 60
    assert {p.name for p in tmp_path.iterdir()} - {"cache", "corpus.txt"} == set()  # no run directory
