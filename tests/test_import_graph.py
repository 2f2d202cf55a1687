"""The wings' arrows, read from the source: the library (``fp8train`` minus its trainer, PTQ, configs and
``__main__``; ``fp8train.optim``; ``fp8train.comm``) imports none of the trainer, PTQ, Hydra, OmegaConf
or wandb, not even inside a function; the trainer does not import PTQ; and no two packages import each
other in a cycle (docs/design.md, "Wings and layers").

Every ``.py`` file of the three source folders is parsed with ``ast``, nothing is imported, so the check
sees imports that a test run never executes (lazy ones in functions, optional backends). The checker
itself is tested on synthetic modules, so that a violation cannot pass unnoticed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the source folders and the package each installs as (pyproject.toml, [tool.setuptools] package-dir)
SOURCE_ROOTS = {"fp8train": REPO / "fp8train", "fp8train.optim": REPO / "optim", "fp8train.comm": REPO / "comm"}
TRAINER, PTQ = "fp8train.trainer", "fp8train.ptq"
NOT_LIBRARY = (TRAINER, PTQ, "fp8train.configs", "fp8train.__main__")  # __main__: the `python -m` entry
LIBRARY_MUST_NOT_IMPORT = (TRAINER, PTQ, "hydra", "omegaconf", "wandb")
TRAINER_MUST_NOT_IMPORT = (PTQ,)


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the source folders."""
    modules = {}
    for package, root in SOURCE_ROOTS.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imported_names(module: str, source: str, *, is_package: bool = False) -> set[str]:
    """Every module name that ``source`` (module ``module``) may import, at any depth of the code:
    ``import a.b`` gives a.b; ``from a import b`` gives a and a.b (b may be a submodule); relative
    imports are resolved; ``importlib.import_module("x")`` / ``__import__("x")`` with a literal give x."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id == "__import__"))):
            names.add(node.args[0].value)
    return names


def violations(module: str, source: str, *, is_package: bool = False) -> list[str]:
    """``module: imported`` for each import that breaks the wings' arrows."""
    if _within(module, (TRAINER,)):
        forbidden = TRAINER_MUST_NOT_IMPORT
    elif _within(module, NOT_LIBRARY):
        return []
    else:
        forbidden = LIBRARY_MUST_NOT_IMPORT
    imported = imported_names(module, source, is_package=is_package)
    return sorted(f"{module}: {name}" for name in imported if _within(name, forbidden))


def _package_of(module: str, packages: set[str]) -> str:
    return max((p for p in packages if _within(module, (p,))), key=len)


def package_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Cycles in the graph of packages (each module counted in its innermost package; the top-level
    modules of fp8train form the package fp8train), imports inside functions included. Left out: a
    package's ``__init__`` re-exporting its own subpackage (fp8train.comm lists fp8train.comm.zero's API),
    and ``__main__``, the entry script, which starts the trainer from the top of the library on purpose."""
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    edges: dict[str, set[str]] = {p: set() for p in packages}
    for name, path in modules.items():
        if name.endswith(".__main__"):
            continue
        source_pkg = _package_of(name, packages)
        for imported in imported_names(name, path.read_text(), is_package=path.name == "__init__.py"):
            if not _within(imported, ("fp8train",)):
                continue
            target = _package_of(imported, packages)
            re_export = path.name == "__init__.py" and _within(target, (name,))
            if target != source_pkg and not re_export:
                edges[source_pkg].add(target)
    cycles, path_stack = [], []

    def visit(node: str, on_stack: set[str], done: set[str]) -> None:
        path_stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt in on_stack:
                cycles.append(path_stack[path_stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, on_stack, done)
        on_stack.discard(node)
        done.add(node)
        path_stack.pop()

    done: set[str] = set()
    for start in sorted(packages):
        if start not in done:
            visit(start, set(), done)
    return cycles


MODULES = _modules()


def test_the_walk_finds_every_wing():
    """The check below is only as good as the files it reads."""
    for module in ("fp8train.linear", "fp8train.models.gpt", "fp8train.optim.adamw", "fp8train.comm.allreduce",
                   "fp8train.comm.zero.optimizer", "fp8train.trainer.loop", "fp8train.ptq.study"):
        assert module in MODULES, module
    assert len(MODULES) > 60


def test_the_library_never_imports_the_trainer_ptq_hydra_or_wandb_and_the_trainer_never_imports_ptq():
    found = [v for name, path in sorted(MODULES.items())
             for v in violations(name, path.read_text(), is_package=path.name == "__init__.py")]
    assert not found, found


def test_no_import_cycle_between_packages():
    assert not package_cycles(MODULES)


# (module, source, is_package, the violation the checker must report): the negative control
SYNTHETIC_VIOLATIONS = {
    "top_level_hydra": ("fp8train.linear", "import hydra.utils\n", False, "hydra.utils"),
    "lazy_trainer": ("fp8train.comm.allreduce", "def f():\n    from fp8train.trainer.run import train\n", False,
                     "fp8train.trainer.run"),
    "submodule_by_from": ("fp8train.optim.adamw", "from fp8train import ptq\n", False, "fp8train.ptq"),
    "relative": ("fp8train.gemm", "from .trainer import loop\n", False, "fp8train.trainer"),
    "relative_in_package": ("fp8train.models", "from ..ptq.quantize import x\n", True, "fp8train.ptq.quantize"),
    "import_module": ("fp8train.cast", "import importlib\nimportlib.import_module('wandb')\n", False, "wandb"),
    "omegaconf": ("fp8train.comm.zero.optimizer", "from omegaconf import DictConfig\n", False, "omegaconf"),
    "trainer_to_ptq": ("fp8train.trainer.loop", "from fp8train.ptq.study import main\n", False,
                       "fp8train.ptq.study"),
}


@pytest.mark.parametrize("case", SYNTHETIC_VIOLATIONS.values(), ids=SYNTHETIC_VIOLATIONS.keys())
def test_the_checker_flags_a_module_that_imports_across(case):
    module, source, is_package, imported = case
    assert f"{module}: {imported}" in violations(module, source, is_package=is_package)


# (module, source): imports that are allowed
SYNTHETIC_ALLOWED = {
    "library_inside": ("fp8train.linear", "from fp8train.formats import E4M3\nfrom . import gemm\nimport torch\n"),
    "similar_name": ("fp8train.gemm", "import fp8train.trainers_guide\nimport hydrangea\n"),
    "trainer_to_library": ("fp8train.trainer.loop", "import hydra\nfrom fp8train.comm import fp8_all_reduce_\n"),
    "ptq_to_trainer": ("fp8train.ptq.study", "from fp8train.trainer.checkpoint import latest_checkpoint\n"),
    "entry_script": ("fp8train.__main__", "from fp8train.trainer.cli import main\n"),
}


@pytest.mark.parametrize("case", SYNTHETIC_ALLOWED.values(), ids=SYNTHETIC_ALLOWED.keys())
def test_the_checker_allows_imports_along_the_arrows(case):
    module, source = case
    assert violations(module, source) == []


def test_the_cycle_check_finds_a_cycle(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "__init__.py").write_text("from fp8train.b import x\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "__init__.py").write_text("def f():\n    from fp8train.a import y\n")
    cycles = package_cycles({"fp8train.a": tmp_path / "a" / "__init__.py",
                             "fp8train.b": tmp_path / "b" / "__init__.py"})
    assert cycles == [["fp8train.a", "fp8train.b", "fp8train.a"]]


# the FP8 core's layers in order (docs/design.md, "Library: FP8 core"): each may import only earlier ones
CORE_LAYERS = ("formats", "scaling", "cast", "tensor", "blocks", "scaling_state", "gemm", "linear_blocks", "linear",
               "conv1d", "convert")


def layer_violations(modules: dict[str, Path]) -> list[str]:
    """``layer: imported layer`` for each core layer that imports itself a later one."""
    found = []
    for i, layer in enumerate(CORE_LAYERS):
        imported = imported_names(f"fp8train.{layer}", modules[f"fp8train.{layer}"].read_text())
        found += [f"{layer}: fp8train.{later}" for later in CORE_LAYERS[i + 1:]
                  if any(_within(name, (f"fp8train.{later}",)) for name in imported)]
    return found


def test_the_fp8_core_layers_import_only_earlier_layers():
    assert not layer_violations(MODULES)


def test_the_layer_check_flags_an_upward_import(tmp_path):
    cast = tmp_path / "cast.py"
    cast.write_text("def f():\n    from fp8train.linear import Fp8Linear\n")
    assert layer_violations({**MODULES, "fp8train.cast": cast}) == ["cast: fp8train.linear"]
