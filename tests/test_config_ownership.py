"""One home per decision (docs/design.md, Conventions): each optimizer setting is validated once, by ``fp8train.optim``,
and every config that holds it (the trainer's ``OptimConfig`` / ``OptimStateConfig``, the library's
``Fp8AdamWConfig``, ``Fp8AdamW`` itself) applies that one rule; the settings a layer reads while it
runs (``Fp8Config``, ``Fp8CommConfig``) are frozen once built. No tensors are compared: these are
config tests (no tolerance tier applies)."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fp8train import Fp8Config, Fp8Linear
from fp8train.comm import Fp8CommConfig
from fp8train.errors import ConfigError
from fp8train.optim import Fp8AdamW, Fp8AdamWConfig
from fp8train.trainer.config import OptimConfig, train_config_from_mapping
from fp8train.trainer.precision import OptimStateConfig

REPO = Path(__file__).resolve().parents[1]
INF, NAN = float("inf"), float("nan")

# ---- AdamW hyperparameters: one rule ---------------------------------------------------------------

# (case, field, value): rejected by every owner. lr / weight_decay: finite >= 0 (an infinite lr
# turns the first step's weights into inf/nan); eps: finite > 0 (eps 0 makes m / sqrt(v) = 0 / 0 =
# nan wherever a gradient element has always been 0, and Fp8AdamW would then skip every step);
# betas in [0, 1) (beta 1 never forgets the initial 0 and bias correction divides by 0).
INVALID = [
    ("lr_inf", "lr", INF),
    ("lr_nan", "lr", NAN),
    ("lr_negative", "lr", -1e-3),
    ("eps_zero", "eps", 0.0),
    ("eps_inf", "eps", INF),
    ("eps_negative", "eps", -1e-8),
    ("weight_decay_inf", "weight_decay", INF),
    ("weight_decay_negative", "weight_decay", -0.1),
    ("beta1_one", "beta1", 1.0),
    ("beta2_negative", "beta2", -0.1),
    ("beta1_nan", "beta1", NAN),
]
VALID = [("lr_zero", "lr", 0.0), ("beta1_zero", "beta1", 0.0), ("eps_tiny", "eps", 1e-30),
         ("weight_decay_zero", "weight_decay", 0.0), ("lr_int", "lr", 1)]


def _optimizer_kwargs(field: str, value: object) -> tuple[dict[str, object], str]:
    """Fp8AdamW's keyword form of one config field, and the name its error uses."""
    if field in ("beta1", "beta2"):
        i = ("beta1", "beta2").index(field)
        betas = [0.9, 0.999]
        betas[i] = value
        return {"betas": tuple(betas)}, f"betas[{i}]"
    return {field: value}, field


def _owners(field: str, value: object):
    """(owner name as the error names it, field as named, constructor) for every holder of the field."""
    kwargs, name = _optimizer_kwargs(field, value)
    min_lr = {"min_lr": 0.0} if field == "lr" else {}  # the schedule's floor stays below any lr tried
    return [
        ("OptimConfig", field, lambda: OptimConfig(**{field: value}, **min_lr)),
        ("Fp8AdamWConfig", field, lambda: Fp8AdamWConfig(**{field: value})),
        ("Fp8AdamW", name, lambda: Fp8AdamW(nn.Linear(2, 2).parameters(), **kwargs)),
    ]


@pytest.mark.parametrize("field, value", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_every_owner_rejects_the_same_hyperparameters_with_the_same_rule(field: str, value: float) -> None:
    allowed = set()
    for owner, name, build in _owners(field, value):
        with pytest.raises(ValueError) as err:
            build()
        message = str(err.value)
        assert message.startswith(f"{owner}.{name}=") and "\n" not in message, message
        allowed.add(message.split("allowed:", 1)[1])
    assert len(allowed) == 1, allowed  # one rule, stated once


@pytest.mark.parametrize("field, value", [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_every_owner_accepts_the_same_hyperparameters(field: str, value: float) -> None:
    for _, _, build in _owners(field, value):
        build()


def test_param_groups_and_the_trainer_key_path_use_the_rule_too() -> None:
    opt = Fp8AdamW(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match=r"^Fp8AdamW.param_groups\[1\].lr=inf is out of range"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": INF})
    with pytest.raises(ConfigError, match=r"^optim: OptimConfig.eps=0.0 is out of range"):
        train_config_from_mapping({"optim": {"eps": 0.0}})
    with pytest.raises(ConfigError, match=r"^optim: OptimConfig.min_lr=nan is out of range; allowed: finite"):
        train_config_from_mapping({"optim": {"min_lr": NAN}})  # the schedule's floor: a learning rate too
    assert math.isclose(OptimConfig(lr=1e-2, min_lr=0.0).lr, 1e-2)


# ---- state formats: public names, one rule ---------------------------------------------------------

FORMAT_FIELDS = ("exp_avg_dtype", "exp_avg_sq_dtype", "master_dtype")
CANDIDATES = ["e4m3", "e5m2", "bf16", "fp16", "fp32", "fp64", None, torch.float32, 3]


def test_state_format_names_are_public() -> None:
    import fp8train.optim as optim

    assert optim.EXP_AVG_FORMATS == ("e4m3", "bf16", "fp16", "fp32")
    assert optim.EXP_AVG_SQ_FORMATS == ("bf16", "fp16", "fp32")
    assert optim.MASTER_FORMATS == ("bf16", "fp16", "fp32", None)
    for name in ("EXP_AVG_FORMATS", "EXP_AVG_SQ_FORMATS", "MASTER_FORMATS", "check_hyperparameters"):
        assert name in optim.__all__


@pytest.mark.parametrize("field", FORMAT_FIELDS)
def test_trainer_and_library_configs_take_the_same_state_formats(field: str) -> None:
    def outcome(cls: type, value: object) -> str:
        try:
            cls(**{field: value})
        except ValueError as e:
            return "rejected:" + str(e).split(f".{field}=", 1)[1]
        return "accepted"

    for value in CANDIDATES:
        assert outcome(OptimStateConfig, value) == outcome(Fp8AdamWConfig, value), value


def test_the_trainer_imports_no_private_module_of_the_optimizer() -> None:
    # the trainer is a client of fp8train.optim: only its public names (fp8train.optim.__all__)
    offenders = []
    for path in sorted((REPO / "fp8train" / "trainer").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fp8train.optim._"):
                offenders.append(f"{path.name}: {node.module}")
    assert not offenders


# ---- frozen configs --------------------------------------------------------------------------------

FROZEN = [
    ("fp8_backend", lambda: Fp8Config(), "backend", "emulated"),
    ("fp8_recipe", lambda: Fp8Config(), "recipe", "delayed"),
    ("fp8_margin", lambda: Fp8Config(), "margin", 2),
    ("comm_format", lambda: Fp8CommConfig(), "format", "e5m2"),
    ("comm_bucket_bytes", lambda: Fp8CommConfig(), "bucket_bytes", 1024),
    ("adamw_lr", lambda: Fp8AdamWConfig(), "lr", 1.0),
    ("trainer_optim_lr", lambda: OptimConfig(), "lr", 1.0),
    ("trainer_optim_state", lambda: OptimStateConfig(), "master_dtype", None),
]


@pytest.mark.parametrize("build, field, value", [c[1:] for c in FROZEN], ids=[c[0] for c in FROZEN])
def test_configs_are_frozen_once_built(build, field: str, value: object) -> None:
    cfg = build()
    before = getattr(cfg, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, field, value)
    assert getattr(cfg, field) == before
    changed = dataclasses.replace(cfg, **{field: value})  # a modified copy is built (and validated) anew
    assert getattr(changed, field) == value and getattr(cfg, field) == before


def test_a_layer_cannot_see_its_shared_config_change_halfway() -> None:
    # Fp8Linear reads config.backend at every forward, its ScalingStates copied recipe/margin once:
    # a mutation would reach one and not the other. Frozen, the only change is a new config.
    shared = Fp8Config(recipe="current", backend="emulated")
    layers = [Fp8Linear(16, 16, config=shared), Fp8Linear(16, 16, config=shared)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        shared.recipe = "delayed"
    with pytest.raises(ValueError, match="Fp8Config.recipe='magic'"):
        dataclasses.replace(shared, recipe="magic")  # replace re-runs the validation
    assert all(layer.config is shared and layer.input_scaling.recipe == "current" for layer in layers)
    assert Fp8Config(grad_output_format=torch.float8_e5m2).grad_output_format == "e5m2"  # still normalised
