"""Transformer Engine backend: the whole linear layer runs in ``transformer_engine.pytorch.Linear``.

TE is an optional extra (``pip install fp8train[te]``, CUDA only) and is imported lazily, on the first
forward of a layer with ``backend="te"``. Its import raises RuntimeError (not ImportError) on machines
without CUDA; both become one clear error here. TE's layer is built to share the ``Fp8Linear``'s own
Parameters, so checkpoints, optimizers and conversion keep working unchanged; TE keeps its own
scaling state (our ScalingState buffers are not used on this path).
"""

from __future__ import annotations

from typing import Any

import torch

from fp8train.config import Fp8Config

__all__ = ["import_te", "te_linear_forward", "te_recipe_kwargs"]


def import_te() -> Any:
    """Imports ``transformer_engine.pytorch`` or raises RuntimeError saying what to do."""
    try:
        import transformer_engine.pytorch as te  # noqa: PLC0415 (optional, lazy)
    except (ImportError, RuntimeError, OSError) as err:
        raise RuntimeError(
            "Fp8Config.backend='te' needs Transformer Engine on a CUDA machine "
            f"(pip install 'fp8train[te]'); importing it failed: {type(err).__name__}: {err}. "
            "Use backend='scaled_mm' or 'emulated' instead."
        ) from err
    return te


def te_recipe_kwargs(config: Fp8Config) -> tuple[str, dict[str, Any]]:
    """(TE recipe class name, its keyword arguments) equivalent to ``config``.

    E4M3 forward / E5M2 backward is TE's ``Format.HYBRID``; all-E4M3 is ``Format.E4M3``.
    """
    fp8_format = "HYBRID" if config.grad_output_format == "e5m2" else "E4M3"
    if config.recipe == "delayed":
        return "DelayedScaling", dict(margin=config.margin, fp8_format=fp8_format,
                                      amax_history_len=config.amax_history_len,
                                      amax_compute_algo=config.amax_compute_algo)
    if config.recipe == "current":
        return "Float8CurrentScaling", dict(fp8_format=fp8_format)
    raise ValueError(f"Fp8Config.recipe={config.recipe!r} has no Transformer Engine equivalent; "
                     "allowed for te: 'current', 'delayed'")


def _build_recipe(config: Fp8Config) -> Any:
    from transformer_engine.common import recipe as te_recipe  # noqa: PLC0415

    name, kwargs = te_recipe_kwargs(config)
    kwargs["fp8_format"] = getattr(te_recipe.Format, kwargs["fp8_format"])
    return getattr(te_recipe, name)(**kwargs)


def te_linear_forward(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    te = import_te()
    if layer._te_layer is None:
        te_layer = te.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                             params_dtype=layer.weight.dtype, device=layer.weight.device)
        te_layer.weight = layer.weight  # share, do not copy
        if layer.bias is not None:
            te_layer.bias = layer.bias
        object.__setattr__(layer, "_te_layer", te_layer)  # not a submodule: no duplicate state
        object.__setattr__(layer, "_te_recipe", _build_recipe(layer.config))
    with te.fp8_autocast(enabled=True, fp8_recipe=layer._te_recipe):
        return layer._te_layer(x)
