"""The ``fp8train`` command (and ``python -m fp8train``): Hydra composes ``configs/``, ``train`` runs.

    fp8train                                         # tiny GPT, FP8 (fp8_o2), bundled Shakespeare, CPU ok
    fp8train precision=fp32 train.steps=100          # another preset, a field changed
    fp8train -m precision=fp32,bf16,fp8_o1,fp8_o2    # a sweep: one run per preset
    torchrun --nproc-per-node=2 -m fp8train precision=fp8_o3
    fp8train --help                                  # groups, options and the composed config

Errors in the config (an unknown key or option, a wrong type, a bad combination, bad data) print
ONE line, ``fp8train: error: ...`` naming the key and what is allowed, exit with status 2, and
leave nothing behind (what the failed invocation had written is removed; earlier runs' files
stay). Hydra is imported here only: ``fp8train.trainer.run.train`` takes typed configs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from importlib import resources
from pathlib import Path

__all__ = ["main"]

_EXIT_CONFIG_ERROR = 2
_EXIT_PEER_LOST = 3
_GROUPS = ("model", "data", "precision", "optim", "parallel", "logging", "launcher", "experiment")


def _fail(message: str) -> None:
    print(f"fp8train: error: {message}", file=sys.stderr)
    sys.exit(_EXIT_CONFIG_ERROR)


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files shipped in ``fp8train.configs/<group>``."""
    folder = resources.files("fp8train.configs") / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local-rank N``, which the DeepSpeed launcher appends (the rank
    is read from LOCAL_RANK, which it sets too); Hydra would reject them."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def _check_overrides(argv: list[str]) -> None:
    """Reject ``group=option`` for options that do not exist and ``a.b=v`` for keys that do not, with
    one line listing the allowed ones (Hydra's own messages span several lines). Sweeps (``a,b``)
    are checked item by item; ``hydra.*`` is Hydra's."""
    from fp8train.trainer.config import unknown_key_message

    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key.split(".")[0] == "hydra":
            continue
        if key not in _GROUPS:
            if (message := unknown_key_message(key)) is not None:
                _fail(message)
            continue
        if value in ("null", ""):
            continue
        allowed = group_options(key)
        items = value.removeprefix("choice(").removesuffix(")").split(",")
        for item in (i.strip() for i in items):
            if item not in allowed:
                _fail(f"{key}={item!r} is not a config option; allowed values: {', '.join(allowed)}")


def _tree(directory: Path) -> set[Path]:
    """Every path under ``directory`` (links not followed), to tell later what this run added."""
    return {Path(root) / name for root, dirs, files in os.walk(directory) for name in (*dirs, *files)}


def _remove_created(directory: Path, before: set[Path]) -> None:
    """Remove what this invocation added under ``directory`` (a config.yaml, a half-made wandb run)
    before it failed; everything that was there before it started stays as it was. A run that got
    as far as writing a checkpoint keeps everything: its outputs are results, not debris."""
    added = _tree(directory) - before
    if any(path.name.startswith("step_") for path in added):
        return
    for root, dirs, files in os.walk(directory, topdown=False):  # children before their folder
        for path in (Path(root) / name for name in (*files, *dirs)):
            if path in before:
                continue
            if path.is_symlink() or not path.is_dir():
                path.unlink(missing_ok=True)
            else:
                with contextlib.suppress(OSError):
                    path.rmdir()  # empty by now, unless something in it was there before
    _remove_if_empty(directory)


def _remove_if_empty(directory: Path) -> None:
    """Hydra creates the run directory before the config is validated; an invalid run leaves none."""
    try:
        directory.rmdir()  # only succeeds when empty
        directory.parent.rmdir()  # outputs/ or multirun/ when this run made it
    except OSError:
        pass


def _lost_peer_message(e: RuntimeError, cfg: object) -> str | None:
    """One line for a collective that failed because another rank died or stopped answering."""
    text = str(e)
    timeout_s = getattr(getattr(cfg, "launcher", None), "timeout_s", "?")
    if "connection refused" in text.lower():
        return f"could not connect to another rank (it died or never started) ({text.splitlines()[0][:200]})"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (f"a collective timed out after launcher.timeout_s={timeout_s} s: another rank stopped answering "
                f"({text.splitlines()[0][:200]})")
    if "connection closed by peer" in text.lower() or "connection reset" in text.lower():
        return f"another rank died during a collective ({text.splitlines()[0][:200]})"
    return None


def _task(cfg: object) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fp8train.errors import ConfigError
    from fp8train.trainer.config import train_config_from_mapping
    from fp8train.trainer.run import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    before = _tree(run_dir)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        result = train(train_config_from_mapping(plain))
    except ConfigError as e:
        _remove_created(run_dir, before)
        _fail(str(e))
    except OmegaConfBaseException as e:  # e.g. a required value (???) left unset
        _remove_if_empty(run_dir)
        _fail(str(e).splitlines()[0] + (f" (key {e.full_key})" if getattr(e, "full_key", None) else ""))
    except RuntimeError as e:
        if (lost := _lost_peer_message(e, cfg)) is None:
            raise
        print(f"fp8train: error: {lost}", file=sys.stderr)
        sys.exit(_EXIT_PEER_LOST)
    return result.val_loss  # what a Hydra sweeper optimises


def main() -> None:
    """Console entry point."""
    import hydra

    argv = _strip_launcher_args(sys.argv[1:])
    _check_overrides(argv)
    sys.argv = [sys.argv[0], *argv]
    hydra.main(version_base="1.3", config_path="pkg://fp8train.configs", config_name="config")(_task)()


if __name__ == "__main__":
    main()
