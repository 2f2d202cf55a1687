"""The design lives in the repository and matches the tree: docs/design.md places every source file,
every path the docs name exists, the README's layout section names every package folder, and nothing
cites a design or style file outside the repository or an unnamed "seed paper"."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "launch" / "README.md"]
SOURCE_FOLDERS = ("fp8train", "optim", "comm")
PACKAGE_FOLDERS = ("fp8train/", "fp8train/models/", "fp8train/trainer/", "fp8train/ptq/", "optim/", "comm/",
                   "comm/zero/", "configs/", "launch/", "bench/", "tests/", "docs/")
# a repository path as docs write it: a top-level folder, then file or folder names
PATH_TOKEN = re.compile(r"(?<![\w./-])((?:fp8train|optim|comm|configs|launch|bench|tests|docs)/[\w./-]*)")
# where code and docs cite: every source file, test, benchmark, launch script and doc
CITING = [path for folder in (*SOURCE_FOLDERS, "tests", "bench", "launch", "docs")
          for path in sorted((REPO / folder).rglob("*")) if path.suffix in {".py", ".md", ".sh", ".c"}]
CITING += [REPO / "README.md", REPO / "Makefile", REPO / "pyproject.toml"]


def _source_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for folder in SOURCE_FOLDERS for p in (REPO / folder).rglob("*.py")
                  if p.name != "__init__.py")


def _layout_section(readme: str) -> str:
    match = re.search(r"^## Layout\n(.*?)(?=^## )", readme, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Layout' section"
    return match.group(1)


def test_the_design_places_every_source_file():
    text = DESIGN.read_text()
    missing = [path for path in _source_files() if f"`{path}`" not in text]
    assert not missing, missing


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_a_doc_names_exists(doc):
    tokens = {m.group(1).rstrip(".,:;") for m in PATH_TOKEN.finditer(doc.read_text())}
    missing = sorted(t for t in tokens if not any(c in t for c in "<*") and not (REPO / t).exists())
    assert not missing, missing


def test_the_readme_layout_names_every_package_folder():
    layout = _layout_section((REPO / "README.md").read_text())
    missing = [folder for folder in PACKAGE_FOLDERS if not re.search(rf"(?<![\w/]){re.escape(folder)}", layout)]
    assert not missing, missing
    assert "docs/design.md" in layout


# name: (marker, why it must not appear)
STALE_CITATIONS = {
    "design_section": ("DESIGN §", "the old plan outside the repository; cite docs/design.md"),
    "design_md": ("DESIGN.md", "the old plan outside the repository; cite docs/design.md"),
    "style_md": ("STYLE.md", "outside the repository; tolerance tiers and conventions are in docs/design.md"),
    "seed_paper": ("seed paper", "name it: the Graphcore paper (arXiv 2309.17224)"),
}


@pytest.mark.parametrize("case", STALE_CITATIONS.values(), ids=STALE_CITATIONS.keys())
def test_no_citation_points_outside_the_repository(case):
    marker, why = case
    found = [f"{path.relative_to(REPO)}:{n}" for path in CITING if path != Path(__file__).resolve()
             for n, line in enumerate(path.read_text().splitlines(), 1) if marker in line]
    assert not found, f"{why}: {found}"
