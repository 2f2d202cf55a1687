"""Transformer Engine as a converter: ``convert_to_te`` swaps eligible ``nn.Linear`` modules for
``transformer_engine.pytorch.Linear``, in place; ``te_forward_context`` is what their forward runs under.

TE replaces the whole layer (its own casts, scaling state and GEMMs), so it is a converter beside
``convert_to_fp8``, not one of ``Fp8Config.backend``'s GEMM engines. Both converters swap the same
modules (``conversion_targets``: eligible dims, output head kept, ``module_filter_fn``).

State: each TE layer is a real submodule holding the Linear's own ``weight`` / ``bias`` Parameters
(same names, same objects: optimizers stay valid and a pre-conversion state_dict loads). TE's FP8
metadata -- scale, scale_inv and amax history of the forward and backward tensors, i.e. delayed
scaling's state -- is the module's extra state, ``<fqn>._extra_state`` in ``model.state_dict()``,
so a checkpoint carries it and ``load_state_dict`` restores it: delayed scaling resumes.

Forward runs under ``te.fp8_autocast(enabled=True, fp8_recipe=...)`` with the recipe built from the
``Fp8Config`` (``te_forward_context``); outside it TE layers compute in high precision. A context,
not a wrapper module: a wrapper would rename every parameter (``module.`` prefix).

TE is an optional extra (``pip install fp8train[te]``, CUDA only), imported lazily by these
functions. Its import raises RuntimeError (not ImportError) on machines without CUDA; both become
one clear error here.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from torch import nn

from fp8train.config import Fp8Config
from fp8train.convert import conversion_targets, replace_submodules

__all__ = ["convert_to_te", "import_te", "te_forward_context", "te_recipe", "te_recipe_kwargs"]


def import_te() -> Any:
    """Imports ``transformer_engine.pytorch`` or raises RuntimeError saying what to do."""
    try:
        import transformer_engine.pytorch as te  # noqa: PLC0415 (optional, lazy)
    except (ImportError, RuntimeError, OSError) as err:
        raise RuntimeError(
            "convert_to_te needs Transformer Engine on a CUDA machine "
            f"(pip install 'fp8train[te]'); importing it failed: {type(err).__name__}: {err}. "
            "Use convert_to_fp8 (Fp8Config.backend 'scaled_mm' or 'emulated') instead."
        ) from err
    return te


def te_recipe_kwargs(config: Fp8Config) -> tuple[str, dict[str, Any]]:
    """(TE recipe class name, its keyword arguments) equivalent to ``config``.

    E4M3 forward / E5M2 backward is TE's ``Format.HYBRID``; all-E4M3 is ``Format.E4M3``. TE has no
    fixed-scale recipe, so "constant" is refused (ValueError) before anything imports TE.
    """
    fp8_format = "HYBRID" if config.grad_output_format == "e5m2" else "E4M3"
    if config.recipe == "delayed":
        return "DelayedScaling", dict(margin=config.margin, fp8_format=fp8_format,
                                      amax_history_len=config.amax_history_len,
                                      amax_compute_algo=config.amax_compute_algo)
    if config.recipe == "current":
        return "Float8CurrentScaling", dict(fp8_format=fp8_format)
    raise ValueError(f"Fp8Config.recipe={config.recipe!r} has no Transformer Engine recipe; "
                     "allowed with convert_to_te: 'current', 'delayed'")


def te_recipe(config: Fp8Config) -> Any:
    """The ``transformer_engine.common.recipe`` object equivalent to ``config``."""
    name, kwargs = te_recipe_kwargs(config)
    import_te()  # the clear error first, if TE is missing
    from transformer_engine.common import recipe as te_recipe_module  # noqa: PLC0415 (optional, lazy)

    kwargs["fp8_format"] = getattr(te_recipe_module.Format, kwargs["fp8_format"])
    return getattr(te_recipe_module, name)(**kwargs)


def te_forward_context(config: Fp8Config, *, fp8_group: Any = None) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of the context each forward of a ``convert_to_te`` model runs under.

    ``fp8_group``: the process group TE reduces amaxes over (None: each rank keeps its own). With
    the data-parallel group every rank holds the same amax history, so one rank's checkpoint is
    every rank's state.
    """
    te = import_te()
    recipe = te_recipe(config)  # built once: TE compares the recipe of each forward to its own
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=fp8_group)


def convert_to_te(
    model: nn.Module,
    *,
    config: Fp8Config | None = None,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    skip_output_head: bool = True,
) -> nn.Module:
    """Replace the ``conversion_targets`` of ``model`` by ``transformer_engine.pytorch.Linear``, in
    place; returns model. Run its forward under ``te_forward_context(config)()``.

    ``config`` is checked here (recipe "constant" has no TE equivalent) even though the recipe
    itself is applied by the forward context. ``Fp8Config.backend`` and ``fast_cast`` do not apply:
    TE picks its own kernels.
    """
    config = config or Fp8Config()
    te_recipe_kwargs(config)  # refuse an unsupported recipe at conversion, not at the first forward
    te = import_te()
    targets = conversion_targets(model, module_filter_fn=module_filter_fn, skip_output_head=skip_output_head)
    return replace_submodules(model, targets, lambda linear: _te_linear(te, linear))


def _te_linear(te: Any, linear: nn.Linear) -> nn.Module:
    """A TE Linear holding ``linear``'s own Parameter objects (no copy)."""
    weight = linear.weight
    layer = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      params_dtype=weight.dtype, device=weight.device)
    layer.weight = weight
    if linear.bias is not None:
        layer.bias = linear.bias
    layer.register_load_state_dict_pre_hook(_keep_extra_state_if_absent)
    return layer


def _keep_extra_state_if_absent(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """A state_dict from before conversion has no ``_extra_state`` for this layer: load the layer's
    current (initial) one, so strict loading succeeds, as Fp8Linear does for its scaling state. A
    state_dict that has it is loaded as is."""
    key = f"{prefix}_extra_state"  # nn.Module's name for get_extra_state()'s value
    if key not in state_dict:
        state_dict[key] = module.get_extra_state()
