"""convert_to_te: Transformer Engine as a converter of its own, beside convert_to_fp8.

TE needs CUDA, so these CPU tests inject a stand-in ``transformer_engine`` package (test
scaffolding in ``sys.modules``; nothing in torch is touched): its ``Linear`` is an ``nn.Linear``
whose extra state is an amax history, updated by each forward under its ``fp8_autocast``. The real
TE path is checked in test_cuda.py.
"""

from __future__ import annotations

import contextlib
import enum
import sys
import types
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from fp8train import Fp8Config, convert_to_fp8, convert_to_te
from fp8train.errors import ConfigError
from fp8train.te import te_forward_context, te_recipe_kwargs
from fp8train.trainer.precision import PrecisionConfig, apply_precision

_HISTORY_LEN = 4


def _fake_te() -> dict[str, types.ModuleType]:
    """The modules of a tiny stand-in for transformer_engine (just the API convert_to_te uses)."""
    open_recipes: list[Any] = []  # recipe of each open fp8_autocast, innermost last

    class Format(enum.Enum):
        E4M3 = "E4M3"
        HYBRID = "HYBRID"

    @dataclass
    class DelayedScaling:
        margin: int = 0
        fp8_format: Format = Format.HYBRID
        amax_history_len: int = 1024
        amax_compute_algo: str = "max"

    @dataclass
    class Float8CurrentScaling:
        fp8_format: Format = Format.HYBRID

    @contextlib.contextmanager
    def fp8_autocast(enabled: bool = True, fp8_recipe: Any = None, fp8_group: Any = None):
        open_recipes.append(fp8_recipe if enabled else None)
        try:
            yield
        finally:
            open_recipes.pop()

    class Linear(nn.Linear):
        def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                     params_dtype: torch.dtype | None = None, device: Any = None) -> None:
            super().__init__(in_features, out_features, bias=bias, device=device, dtype=params_dtype)
            self.amax_history = torch.zeros(_HISTORY_LEN)  # a plain attribute: only extra state saves it
            self.recipes_seen: list[Any] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if open_recipes and open_recipes[-1] is not None:
                self.recipes_seen.append(open_recipes[-1])
                amax = x.detach().abs().amax().float().reshape(1)
                self.amax_history = torch.cat([amax, self.amax_history[:-1]])
            return super().forward(x)

        def get_extra_state(self) -> torch.Tensor:
            return self.amax_history.clone()

        def set_extra_state(self, state: torch.Tensor) -> None:
            self.amax_history = state.clone()

    root = types.ModuleType("transformer_engine")
    pytorch = types.ModuleType("transformer_engine.pytorch")
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    pytorch.Linear, pytorch.fp8_autocast = Linear, fp8_autocast
    recipe.Format, recipe.DelayedScaling, recipe.Float8CurrentScaling = Format, DelayedScaling, Float8CurrentScaling
    root.pytorch, root.common, common.recipe = pytorch, common, recipe
    return {m.__name__: m for m in (root, pytorch, common, recipe)}


@pytest.fixture
def fake_te(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    modules = _fake_te()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules["transformer_engine.pytorch"]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.odd = nn.Linear(64, 24, bias=False)   # 24 is not a multiple of 16: never converted
        self.back = nn.Linear(24, 32)              # 24 again
        self.mid = nn.Sequential(nn.Linear(32, 32, bias=False), nn.GELU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 16)              # the last Linear: the output head

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # (B, 32) -> (B, 16)
        return self.head(self.mid(self.back(self.odd(self.up(x)))))


def _names_of(model: nn.Module, cls: type) -> list[str]:
    return [fqn for fqn, m in model.named_modules() if type(m) is cls]


@pytest.mark.parametrize(("kwargs", "expected"), [
    (dict(), ["up", "mid.0", "mid.2"]),
    (dict(skip_output_head=False), ["up", "mid.0", "mid.2", "head"]),
    (dict(module_filter_fn=lambda module, fqn: fqn.startswith("mid.")), ["mid.0", "mid.2"]),
], ids=["default", "with_head", "filter_fn"])
def test_converts_the_layers_convert_to_fp8_would(fake_te, kwargs: dict, expected: list[str]) -> None:
    model = convert_to_te(_Net(), **kwargs)
    assert _names_of(model, fake_te.Linear) == expected
    fp8 = convert_to_fp8(_Net(), **kwargs)  # one filter rule for both converters
    assert [fqn for fqn, m in fp8.named_modules() if type(m).__name__ == "Fp8Linear"] == expected


def test_te_layers_are_real_submodules_sharing_the_parameters(fake_te) -> None:
    model = _Net()
    before = dict(model.named_parameters())
    convert_to_te(model)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(before[k] is after[k] for k in before)  # an optimizer built before keeps working
    assert model.mid[0].bias is None
    assert {f"{fqn}._extra_state" for fqn in ("up", "mid.0", "mid.2")} <= model.state_dict().keys()


def test_state_dict_saved_before_conversion_loads_after_it(fake_te) -> None:
    saved = _Net().state_dict()
    target = convert_to_te(_Net())
    target.load_state_dict(saved, strict=True)  # no _extra_state in it: TE keeps its initial state
    for name, tensor in saved.items():  # lossless: tier 1
        assert torch.equal(target.state_dict()[name], tensor), name
    assert torch.equal(target.up.amax_history, torch.zeros(_HISTORY_LEN))


def test_te_scaling_state_round_trips_through_state_dict(fake_te) -> None:
    config = Fp8Config(recipe="delayed", amax_history_len=_HISTORY_LEN)
    a = convert_to_te(_Net(), config=config)
    forward_ctx = te_forward_context(config)
    for scale in (1.0, 3.0, 0.5):
        with forward_ctx():
            a(torch.randn(8, 32) * scale).sum().backward()
    assert (a.up.amax_history[:3] > 0).all()
    b = convert_to_te(_Net(), config=config)
    b.load_state_dict(a.state_dict(), strict=True)
    for name, value in a.state_dict().items():  # lossless: tier 1, the amax history included
        assert torch.equal(b.state_dict()[name], value), name
    assert torch.equal(b.mid[2].amax_history, a.mid[2].amax_history)


@pytest.mark.parametrize(("recipe", "grad_fmt", "expected"), [
    ("delayed", "e5m2", ("DelayedScaling", dict(margin=2, fp8_format="HYBRID", amax_history_len=16,
                                                amax_compute_algo="max"))),
    ("current", "e5m2", ("Float8CurrentScaling", dict(fp8_format="HYBRID"))),
    ("current", "e4m3", ("Float8CurrentScaling", dict(fp8_format="E4M3"))),
])
def test_te_recipe_mapping(recipe: str, grad_fmt: str, expected) -> None:
    with pytest.warns(UserWarning) if grad_fmt == "e4m3" else contextlib.nullcontext():
        config = Fp8Config(recipe=recipe, margin=2, grad_output_format=grad_fmt)
    assert te_recipe_kwargs(config) == expected


def test_forward_runs_under_the_recipe_built_from_fp8_config(fake_te) -> None:
    config = Fp8Config(recipe="delayed", margin=1, amax_history_len=8, amax_compute_algo="most_recent")
    model = convert_to_te(_Net(), config=config)
    with te_forward_context(config)():
        model(torch.randn(2, 32))
    (recipe,) = model.up.recipes_seen
    recipe_mod = sys.modules["transformer_engine.common.recipe"]
    assert recipe == recipe_mod.DelayedScaling(margin=1, fp8_format=recipe_mod.Format.HYBRID,
                                               amax_history_len=8, amax_compute_algo="most_recent")


def test_constant_recipe_is_refused_before_importing_te(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # importing it raises ImportError
    with pytest.raises(ValueError, match=r"^Fp8Config.recipe='constant' has no Transformer Engine recipe; "
                                         r"allowed with convert_to_te: 'current', 'delayed'$"):
        convert_to_te(_Net(), config=Fp8Config(recipe="constant"))


def test_missing_transformer_engine_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # as on a machine without TE
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    for call in (lambda: convert_to_te(_Net()), lambda: te_forward_context(Fp8Config())):
        with pytest.raises(RuntimeError, match=r"convert_to_te needs Transformer Engine on a CUDA machine") as err:
            call()
        assert "\n" not in str(err.value)


def test_te_is_no_longer_a_gemm_backend() -> None:
    with pytest.raises(ValueError, match=r"Fp8Config.backend='te' is not a GEMM backend.*convert_to_te") as err:
        Fp8Config(backend="te")
    assert "\n" not in str(err.value)


# --- the trainer's side: precision.fp8_converter picks the converter ---------------------------

def test_trainer_converts_with_te_and_runs_forward_under_its_recipe(fake_te) -> None:
    cfg = PrecisionConfig(fp8_converter="te", fp8=Fp8Config(recipe="delayed", margin=3))
    model = _Net()
    forward_ctx = apply_precision(model, cfg, torch.device("cpu"))
    assert _names_of(model, fake_te.Linear) == ["up", "mid.0", "mid.2"]
    with forward_ctx():
        model(torch.randn(2, 32))
    assert model.up.recipes_seen[0].margin == 3


def test_trainer_te_with_no_eligible_layer_is_a_config_error(fake_te) -> None:
    with pytest.raises(ConfigError, match="no Linear layer of the model is eligible for FP8"):
        apply_precision(nn.Sequential(nn.Linear(24, 40)), PrecisionConfig(fp8_converter="te"), torch.device("cpu"))


BAD_PRECISION = [  # (case, config mapping under precision, message fragment)
    ("unknown converter", {"fp8_converter": "apex"},
     "precision.fp8_converter='apex' is not allowed; allowed values: 'native', 'te'"),
    ("old te backend", {"fp8": {"backend": "te"}},
     "precision.fp8: Fp8Config.backend='te' is not a GEMM backend"),
    ("te without fp8 gemm", {"gemm": "bf16", "fp8_converter": "te"},
     "PrecisionConfig.fp8_converter='te' needs gemm='fp8' (got 'bf16')"),
    ("te with constant", {"fp8_converter": "te", "fp8": {"recipe": "constant"}},
     "Fp8Config.recipe='constant' has no Transformer Engine recipe"),
    ("te with fp8 weights", {"fp8_converter": "te", "fp8_weights": True},
     "PrecisionConfig.fp8_weights=True needs fp8_converter='native'"),
]


@pytest.mark.parametrize(("case", "precision", "message"), BAD_PRECISION, ids=[c[0] for c in BAD_PRECISION])
def test_bad_converter_config_is_one_line(case: str, precision: dict, message: str) -> None:
    from fp8train.trainer.config import train_config_from_mapping

    data = {"precision": precision}
    if precision.get("fp8_weights"):
        data["parallel"] = {"strategy": "zero2"}
    with pytest.raises(ConfigError) as err:
        train_config_from_mapping(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
