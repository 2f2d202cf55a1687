"""Token files, the train/val split and the resumable window sampler (fp8train.trainer.data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fp8train.errors import ConfigError
from fp8train.trainer.data import DataConfig, WindowSampler, load_token_data, prepare_token_file, validation_windows


def _text(tmp_path, n_bytes: int, name: str = "corpus.txt"):
    path = tmp_path / name
    path.write_bytes(bytes((i * 7 + 3) % 251 for i in range(n_bytes)))
    return path


def test_bundled_corpus_is_prepared_once_into_the_cache(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    path, dtype = prepare_token_file(cfg)
    assert path.parent == tmp_path and dtype == "uint8" and path.stat().st_size > 5_000_000
    mtime = path.stat().st_mtime_ns
    assert prepare_token_file(cfg)[0] == path and path.stat().st_mtime_ns == mtime  # not rewritten
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind
    data = load_token_data(cfg, seq_len=128, vocab_size=256)
    assert len(data.train) + len(data.val) == path.stat().st_size
    assert abs(len(data.val) / path.stat().st_size - 0.1) < 1e-6
    assert bytes(data.train[:2000]).decode("utf-8", errors="strict")  # real English text, byte tokens


def test_text_file_tokens_are_its_bytes(tmp_path):
    path = _text(tmp_path, 10_000)
    data = load_token_data(DataConfig(path=str(path), val_fraction=0.2), seq_len=16, vocab_size=256)
    assert np.array_equal(np.concatenate([data.train, data.val]), np.frombuffer(path.read_bytes(), np.uint8))
    assert len(data.val) == 2_000


def test_pretokenized_bin_file(tmp_path):
    ids = (np.arange(5_000) * 13 % 1000).astype(np.uint16)
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    data = load_token_data(DataConfig(path=str(path), bin_dtype="uint16"), seq_len=32, vocab_size=1000)
    assert np.array_equal(np.concatenate([data.train, data.val]), ids)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _bin(path, ids):
    np.asarray(ids, dtype=np.uint16).tofile(path)
    return path


BAD_DATA = [
    ("missing", lambda p: p / "nope.txt", "does not exist"),
    ("empty", lambda p: _write(p / "e.txt", b""), "is empty"),
    ("too_short_for_one_window", lambda p: _text(p, 100), "fewer than one sequence"),
    ("bin_not_multiple_of_dtype", lambda p: _write(p / "t.bin", b"\x01\x02\x03"), "not a multiple"),
    ("token_id_beyond_vocab", lambda p: _bin(p / "v.bin", [300] * 4000), "does not fit model.vocab_size"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in BAD_DATA], ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_a_one_line_config_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        load_token_data(DataConfig(path=str(path)), seq_len=64, vocab_size=256)
    assert "\n" not in str(err.value) and "data.path" in str(err.value)


def test_sampler_is_deterministic_and_resumable():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = WindowSampler(tokens, seq_len=16, seed=3)
    first = [a.next_batch(batch_size=4, rank=0, world_size=1) for _ in range(10)]
    b = WindowSampler(tokens, seq_len=16, seed=3, position=a.position - 5 * 4)
    for x, y in first[5:]:
        bx, by = b.next_batch(batch_size=4, rank=0, world_size=1)
        assert torch.equal(bx, x) and torch.equal(by, y)
    x, y = first[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one token


def test_global_window_order_does_not_depend_on_world_size():
    tokens = np.arange(20_000, dtype=np.uint16)
    one = WindowSampler(tokens, seq_len=8, seed=1)
    x1, _ = one.next_batch(batch_size=8, rank=0, world_size=1)
    parts = []
    for rank in range(4):
        s = WindowSampler(tokens, seq_len=8, seed=1)
        parts.append(s.next_batch(batch_size=2, rank=rank, world_size=4)[0])
        assert s.position == one.position
    assert torch.equal(torch.cat(parts), x1)


def test_every_window_once_per_epoch_and_epochs_differ():
    tokens = np.arange(1 + 16 * 50, dtype=np.uint16)
    s = WindowSampler(tokens, seq_len=16, seed=0)
    starts = [int(s.next_batch(batch_size=1, rank=0, world_size=1)[0][0, 0]) for _ in range(2 * s.n_windows)]
    epoch0, epoch1 = starts[: s.n_windows], starts[s.n_windows:]
    assert len(set(epoch0)) == s.n_windows and len(set(epoch1)) == s.n_windows
    assert epoch0 != epoch1
    assert len({v % 16 for v in epoch0}) == 1  # one shift per epoch: windows stay seq_len apart


def test_validation_batches_are_fixed_and_dealt_to_ranks():
    tokens = np.arange(4_000, dtype=np.uint16)
    whole = validation_windows(tokens, seq_len=10, batch_size=6, n_batches=2, rank=0, world_size=1)
    r0 = validation_windows(tokens, seq_len=10, batch_size=3, n_batches=1, rank=0, world_size=2)
    r1 = validation_windows(tokens, seq_len=10, batch_size=3, n_batches=1, rank=1, world_size=2)
    assert torch.equal(torch.cat([r0[0][0], r1[0][0]]), whole[0][0])
    again = validation_windows(tokens, seq_len=10, batch_size=6, n_batches=2, rank=0, world_size=1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole, again))
