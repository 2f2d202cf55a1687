"""Training data: a token file on disk, a train/val split, and deterministic, resumable batches.

Sources (``DataConfig.path``):
  None        the bundled Shakespeare corpus (``fp8train.trainer.corpus``), prepared ONCE into a cached
              uint8 token file (byte-level tokenizer) under ``cache_dir``, named by the content hash;
  *.bin       a pre-tokenized file: raw little-endian token ids of ``bin_dtype`` (nanoGPT layout);
  other       a text file, tokenized by the byte-level tokenizer: its bytes ARE its tokens (vocab 256),
              so it is memory-mapped as it is, without a copy.

Split: the first (1 - val_fraction) of the token stream trains, the rest validates.

Batches: the train split is cut into windows of seq_len + 1 tokens at stride seq_len (each token is
predicted once per epoch). Epoch e visits the windows in a permutation seeded by (seed, e), shifted
by a per-epoch offset in [0, seq_len) so that window boundaries move between epochs. The sampler's
only state is ``position``, the number of windows the whole job has consumed: step s of rank r reads
windows [position + r*B, position + (r+1)*B) of that stream (B = micro-batch size), so a resumed run
reads exactly the batches an uninterrupted one would, and the global order of windows does not
depend on the world size. One micro-step of the job reads micro_batch_size x world_size windows, which
must be distinct: more than the split holds is a config error (``check_micro_batch``), raised before
anything large is allocated.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fp8train._atomic import atomic_write
from fp8train.errors import ConfigError
from fp8train.trainer.corpus import corpus_files

__all__ = ["DataConfig", "TokenData", "WindowSampler", "check_micro_batch", "load_token_data", "prepare_token_file",
           "train_windows", "validation_windows"]

_BIN_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32}
_CACHE_VERSION = 1  # bump when the prepared file's layout changes
# A "text" source whose first MiB is over 1 % NUL bytes is taken for mislabelled token ids: text
# has none, while uint16 / uint32 ids have a zero high byte for every id < 256 / 65536 (a byte stream
# used as tokens may hold a few, so one NUL alone is not an error).
_BINARY_SNIFF_BYTES = 1 << 20
_BINARY_NUL_SHARE = 0.01


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """name:         label for logs and run names.
    path:         None (the bundled Shakespeare corpus), a text file (byte-level tokens) or a
                  pre-tokenized ``.bin`` file of ``bin_dtype`` token ids.
    bin_dtype:    element type of a ``.bin`` file: "uint8" | "uint16" | "uint32".
    tokenizer:    "byte" (UTF-8 bytes, vocab 256): the only tokenizer for text sources.
    val_fraction: share of the token stream (its end) held out for validation, in (0, 0.5].
    cache_dir:    where prepared token files live; None: $XDG_CACHE_HOME/fp8train or ~/.cache/fp8train.
    """

    name: str = "shakespeare"
    path: str | None = None
    bin_dtype: Literal["uint8", "uint16", "uint32"] = "uint16"
    tokenizer: Literal["byte"] = "byte"
    val_fraction: float = 0.1
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction <= 0.5:
            raise ValueError(f"DataConfig.val_fraction={self.val_fraction!r} is out of range; allowed: (0, 0.5]")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fp8train"


@dataclass(frozen=True, slots=True)
class TokenData:
    """Memory-mapped token ids, split into train and val (views, nothing copied)."""

    train: np.ndarray
    val: np.ndarray
    source: str

    @property
    def max_token(self) -> int:
        return int(max(self.train.max(initial=0), self.val.max(initial=0)))


def prepare_token_file(cfg: DataConfig) -> tuple[Path, str]:
    """The token file for ``cfg`` and its numpy dtype name, preparing the bundled corpus's cache
    file if it is not there yet (atomic: a crash leaves no partial cache). Idempotent; call it on
    one rank, then let the others read. ConfigError for a missing or empty source."""
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.path={cfg.path!r} does not exist or is not a file")
        if path.stat().st_size == 0:
            raise ConfigError(f"data.path={cfg.path!r} is empty")
        if path.suffix == ".bin":
            itemsize = np.dtype(_BIN_DTYPES[cfg.bin_dtype]).itemsize
            if path.stat().st_size % itemsize:
                raise ConfigError(f"data.path={cfg.path!r} has {path.stat().st_size} bytes, not a multiple of "
                                  f"data.bin_dtype={cfg.bin_dtype!r} ({itemsize} bytes); allowed bin_dtype: "
                                  + ", ".join(_BIN_DTYPES))
            return path, cfg.bin_dtype
        with path.open("rb") as f:  # the first MiB is enough to tell, and cheap for any size
            head = f.read(_BINARY_SNIFF_BYTES)
        if head.count(0) > _BINARY_NUL_SHARE * len(head):
            raise ConfigError(f"data.path={cfg.path!r} looks binary ({head.count(0) / len(head):.0%} NUL bytes) but "
                              "is read as text; pre-tokenized ids belong in a .bin file with data.bin_dtype")
        return path, "uint8"  # byte-level tokens of a text file are its bytes
    try:
        files = corpus_files()
    except FileNotFoundError as e:
        raise ConfigError(f"data.path=None (bundled corpus): {e}") from None
    digest = hashlib.sha256(f"fp8train-corpus-v{_CACHE_VERSION}:byte".encode())
    for f in files:
        digest.update(f.read_bytes())
    cached = cfg.resolved_cache_dir() / f"shakespeare-byte-{digest.hexdigest()[:16]}.bin"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, lambda out: out.write(b"\n\n".join(f.read_bytes() for f in files)))
    return cached, "uint8"


def load_token_data(cfg: DataConfig, *, seq_len: int, vocab_size: int) -> TokenData:
    """Memory-map the prepared file and split it. ConfigError if either split is shorter than one
    window (seq_len + 1 tokens) or a token id does not fit ``vocab_size``."""
    path, dtype = prepare_token_file(cfg)  # cheap when prepared: hashes the source, writes nothing
    tokens = np.memmap(path, dtype=_BIN_DTYPES[dtype], mode="r")
    n_val = int(len(tokens) * cfg.val_fraction)
    data = TokenData(train=tokens[: len(tokens) - n_val], val=tokens[len(tokens) - n_val:], source=str(path))
    for split, arr in (("train", data.train), ("val", data.val)):
        if len(arr) < seq_len + 1:
            raise ConfigError(f"data.path={cfg.path!r}: the {split} split holds {len(arr)} tokens, fewer than one "
                              f"sequence of model.block_size + 1 = {seq_len + 1}; use more data, a smaller "
                              "block_size or another data.val_fraction")
    if data.max_token >= vocab_size:
        raise ConfigError(f"data.path={cfg.path!r} holds token id {data.max_token}, which does not fit "
                          f"model.vocab_size={vocab_size}; allowed: vocab_size > {data.max_token}")
    return data


def train_windows(n_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens the sampler cuts from a train split of ``n_tokens`` per epoch:
    the same count whatever the epoch's shift (shift <= seq_len - 1)."""
    return (n_tokens - seq_len) // seq_len


def check_micro_batch(data: TokenData, *, seq_len: int, micro_batch_size: int, world_size: int) -> None:
    """ConfigError (one line) when a micro-step of the whole job, ``micro_batch_size`` windows on
    each of ``world_size`` processes, needs more windows than the train split holds: the batch
    would repeat windows (and a huge one allocates gigabytes before failing). Call it right after
    ``load_token_data``, before the model is built. Validation batches wrap around the val split
    by design (``validation_windows``), so they need no such check."""
    n_windows = train_windows(len(data.train), seq_len)
    most = n_windows // world_size
    if micro_batch_size <= most:
        return
    allowed = (f"train.micro_batch_size in [1, {most}]" if most >= 1 else
               f"at most {n_windows} processes with train.micro_batch_size=1")
    raise ConfigError(f"train.micro_batch_size={micro_batch_size} on {world_size} process(es) needs "
                      f"{micro_batch_size * world_size} windows per micro-step, but the train split holds {n_windows} "
                      f"windows of model.block_size + 1 = {seq_len + 1} tokens; allowed: {allowed} (or more data, "
                      "a smaller block_size)")


def _windows(arr: np.ndarray, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = torch.from_numpy(np.stack([arr[s: s + seq_len + 1] for s in starts.tolist()]).astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]                                          # (B, T) inputs, (B, T) targets


class WindowSampler:
    """Deterministic, resumable train batches (see the module docstring). ``position`` is the whole
    job's count of consumed windows: save it, and restore it to resume."""

    def __init__(self, tokens: np.ndarray, *, seq_len: int, seed: int, position: int = 0) -> None:
        self.tokens, self.seq_len, self.seed, self.position = tokens, seq_len, seed, position
        self.n_windows = train_windows(len(tokens), seq_len)
        if self.n_windows < 1:
            raise ConfigError(f"the train split holds {len(tokens)} tokens, too few for one shifted window of "
                              f"{seq_len + 1}; use more data or a smaller model.block_size")
        self._epoch, self._perm, self._shift = -1, torch.empty(0, dtype=torch.int64), 0

    def _window_start(self, index: int) -> int:
        epoch, j = divmod(index, self.n_windows)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n_windows, generator=gen)
            self._shift = int(torch.randint(self.seq_len, (1,), generator=gen))
            self._epoch = epoch
        return self._shift + int(self._perm[j]) * self.seq_len

    @property
    def epoch(self) -> float:
        return self.position / self.n_windows

    def next_batch(self, *, batch_size: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets), (B, T) int64 each; advances ``position`` by the WHOLE job's
        micro-batch (world_size * batch_size windows), identically on every rank."""
        first = self.position + rank * batch_size
        starts = torch.tensor([self._window_start(first + i) for i in range(batch_size)])
        self.position += world_size * batch_size
        return _windows(self.tokens, starts, self.seq_len)


def validation_windows(tokens: np.ndarray, *, seq_len: int, batch_size: int, n_batches: int,
                       rank: int, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same validation batches at every evaluation: windows 0, 1, ... of the val split at stride
    seq_len (wrapping around if the split is short), dealt to ranks batch by batch."""
    n_windows = (len(tokens) - 1) // seq_len
    batches = []
    for b in range(n_batches):
        first = (b * world_size + rank) * batch_size
        starts = torch.tensor([((first + i) % n_windows) * seq_len for i in range(batch_size)])
        batches.append(_windows(tokens, starts, seq_len))
    return batches
