"""``convert_to_fp8``: swap eligible ``nn.Linear`` modules for ``Fp8Linear``, and transformers'
``Conv1D`` (GPT-2's projections, weight (in, out)) for ``Fp8Conv1D``, in place."""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn

from fp8train.config import Fp8Config
from fp8train.conv1d import Fp8Conv1D
from fp8train.linear import Fp8Linear

__all__ = ["FP8_DIM_MULTIPLE", "conversion_targets", "convert_to_fp8", "is_fp8_eligible", "replace_submodules"]

# FP8 tensor cores (and torch._scaled_mm) need both GEMM dims of the weight to be multiples of 16.
FP8_DIM_MULTIPLE = 16


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D``, without importing transformers: an instance
    exists only once ``transformers.pytorch_utils`` has been imported."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def is_fp8_eligible(module: nn.Module, *, include_conv1d: bool = False) -> bool:
    """A plain nn.Linear (not already FP8) whose in and out features are multiples of 16; with
    ``include_conv1d``, also a transformers ``Conv1D`` whose weight (in, out) has both dims so."""
    if include_conv1d and _is_hf_conv1d(module):
        return all(dim % FP8_DIM_MULTIPLE == 0 for dim in module.weight.shape)
    return (isinstance(module, nn.Linear) and not isinstance(module, Fp8Linear)
            and module.in_features % FP8_DIM_MULTIPLE == 0 and module.out_features % FP8_DIM_MULTIPLE == 0)


def _output_head_fqn(model: nn.Module) -> str | None:
    """The output head: the last linear layer (nn.Linear or Conv1D) in registration order (lm_head
    in GPT, Llama and HF causal-LM classes). Its logits feed a softmax over the vocabulary, where
    FP8's 3 mantissa bits cost the most loss; frameworks keep it in high precision by default."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) or _is_hf_conv1d(m)]
    return linears[-1] if linears else None


def conversion_targets(
    model: nn.Module,
    *,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    skip_output_head: bool = True,
    include_conv1d: bool = False,
) -> list[str]:
    """Names of the modules a converter (``convert_to_fp8``, ``fp8train.te.convert_to_te``) swaps.

    A module is a target when it is eligible (``is_fp8_eligible``), is not the output head (unless
    ``skip_output_head=False``), and ``module_filter_fn(module, fqn)`` returns True (when given).
    ``include_conv1d``: transformers' ``Conv1D`` layers are eligible too (``convert_to_fp8``); not
    for ``convert_to_te``, whose Linear stores its weight (out, in): a Conv1D's (in, out) Parameter
    would have to be copied or renamed, so under TE they stay in high precision.
    """
    head = _output_head_fqn(model) if skip_output_head else None
    return [fqn for fqn, module in model.named_modules()
            if fqn != head and is_fp8_eligible(module, include_conv1d=include_conv1d)
            and (module_filter_fn is None or module_filter_fn(module, fqn))]


def convert_to_fp8(
    model: nn.Module,
    *,
    config: Fp8Config | None = None,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    skip_output_head: bool = True,
    fp8_weights: bool = False,
) -> nn.Module:
    """Replace eligible ``nn.Linear`` modules of ``model`` by ``Fp8Linear`` and transformers'
    ``Conv1D`` modules by ``Fp8Conv1D``, in place; returns model.

    The modules replaced are ``conversion_targets(model, module_filter_fn=..., skip_output_head=...,
    include_conv1d=True)``: one set of rules (dims multiples of 16, output head kept) for both kinds.
    Parameters are reused, not copied: their names, values, shapes (a Conv1D's weight stays (in, out))
    and identity are unchanged, so a state_dict saved before conversion loads after it, and an
    existing optimizer keeps working. Nothing in torch is patched.
    ``fp8_weights``: the converted layers store their weights in FP8 (``Fp8Linear(fp8_weight=True)``);
    a weight another module shares (tied) is refused, since that module reads its values, and so is
    a Conv1D target (``Fp8Conv1D`` has no FP8 primary weight).
    """
    config = config or Fp8Config()
    targets = conversion_targets(model, module_filter_fn=module_filter_fn, skip_output_head=skip_output_head,
                                 include_conv1d=True)
    if fp8_weights:
        _check_no_conv1d(model, targets)
        _check_untied(model, targets)
    return replace_submodules(model, targets, lambda module: _to_fp8(module, config, fp8_weights))


def _to_fp8(module: nn.Module, config: Fp8Config, fp8_weight: bool) -> Fp8Linear:
    if _is_hf_conv1d(module):
        return Fp8Conv1D.from_conv1d(module, config)
    return Fp8Linear.from_linear(module, config, fp8_weight=fp8_weight)


def _check_no_conv1d(model: nn.Module, targets: list[str]) -> None:
    conv1d = [fqn for fqn in targets if _is_hf_conv1d(model.get_submodule(fqn))]
    if conv1d:
        raise ValueError(f"convert_to_fp8(fp8_weights=True): {conv1d[0]!r} is a transformers Conv1D (weight stored "
                         f"(in, out)), which has no FP8 primary weight ({len(conv1d)} such layers); allowed: "
                         "fp8_weights=False, or module_filter_fn leaving the Conv1D layers out")


def _check_untied(model: nn.Module, targets: list[str]) -> None:
    uses: dict[int, list[str]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        for name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            uses.setdefault(id(p), []).append(f"{fqn}.{name}" if fqn else name)
    for fqn in targets:
        names = uses[id(model.get_submodule(fqn).weight)]
        if len(set(names)) > 1:
            raise ValueError(f"convert_to_fp8(fp8_weights=True): {names[0]!r} is tied to {names[1]!r}; FP8 primary "
                             "weights need a weight no other module reads (allowed: untie it, or filter the layer "
                             "out with module_filter_fn)")


def replace_submodules(model: nn.Module, fqns: list[str], make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Set each submodule named in ``fqns`` to ``make(old submodule)``, in place; returns model."""
    for fqn in fqns:
        parent_name, _, child_name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, make(getattr(parent, child_name)))
    return model
