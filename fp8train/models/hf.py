"""HF transformers causal LMs built from a config (random init), behind fp8train's model interface.

``build_hf_causal_lm("transformers.LlamaConfig", {...}, vocab_size=256, block_size=128)`` returns an
``HfCausalLM`` whose ``forward(idx, targets=None)`` returns ``(logits, loss)`` like ``GPT`` and
``Llama``. transformers is imported only when a model is built (``import fp8train.models`` does not
import it); it is the optional extra ``fp8train[hf]``. ``AutoModelForCausalLM.from_config`` builds
the architecture with random weights and downloads nothing (no Hub access; the tests guard sockets).

Conversion: ``convert_to_fp8`` swaps ``nn.Linear`` modules and keeps the last one registered (the
output head) in high precision. Llama / Mistral / Qwen2-style models (``q/k/v/o_proj``,
``gate/up/down_proj``, then ``lm_head``): every projection is an ``nn.Linear`` and ``lm_head`` is
registered last. GPT-2 (``transformers.GPT2Config``): its attention and MLP use transformers'
``Conv1D`` (weight (in, out)), which ``convert_to_fp8`` swaps for ``fp8train.conv1d.Fp8Conv1D``
(same parameters); ``convert_to_bf16_emulated`` and ``convert_to_te`` do not convert them: there
they stay in full precision (``build_hf_causal_lm`` warns).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fp8train._validate import check_int_range

__all__ = ["HfCausalLM", "build_hf_causal_lm"]

_CONFIG_FIELD = "model.config._target_"
_KWARGS_FIELD = "model.config"
_EXAMPLE = "expected a transformers config class such as 'transformers.LlamaConfig'"
# Config fields fp8train sets from the data; the names differ between architectures.
_VOCAB_FIELDS = ("vocab_size",)
_POSITION_FIELDS = ("max_position_embeddings", "n_positions")
# Parameter precision is the trainer's (fp32 master weights; the precision group decides the GEMMs).
_REJECTED_KWARGS = ("dtype", "torch_dtype")


class HfCausalLM(nn.Module):
    """A transformers ``*ForCausalLM`` model (``hf_model``) with fp8train's model interface.

    ``forward(idx, targets=None)``: idx (B, T) token ids; returns logits (B, T, V) and, with
    targets (B, T), the fp32 mean cross-entropy of logits vs targets. The targets are used as
    given: the data pipeline has already shifted them by one token, so HF's internal label shift
    (``labels=``) is not used. ``block_size``: the longest sequence accepted, in tokens.
    """

    def __init__(self, hf_model: nn.Module, *, block_size: int) -> None:
        super().__init__()
        check_int_range("HfCausalLM", "block_size", block_size, 1)
        self.hf_model = hf_model
        self.block_size = block_size

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        _, t = idx.shape
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds the HF model's block_size={self.block_size}")
        logits = self.hf_model(input_ids=idx).logits                        # (B, T, V)
        loss = None
        if targets is not None:
            # fp32 cross-entropy, as in GPT / Llama: log-softmax over V in bf16 would lose the
            # small logit differences.
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def _import_transformers() -> Any:
    try:
        import transformers
    except ModuleNotFoundError as err:
        if err.name != "transformers":  # a broken install: show the real error
            raise
        raise ImportError("model=hf needs the transformers package: pip install 'fp8train[hf]'") from None
    return transformers


def _resolve_config_class(path: Any, transformers: Any) -> type:
    """The class named by the dotted path ``path``; ValueError naming model.config._target_ if it
    cannot be imported or is not a transformers PretrainedConfig subclass."""
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"{_CONFIG_FIELD}={path!r} is not a dotted path; {_EXAMPLE}")
    module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{_CONFIG_FIELD}={path!r} cannot be imported ({reason}); {_EXAMPLE}") from None
    if not (isinstance(obj, type) and issubclass(obj, transformers.PretrainedConfig)):
        what = f"class {obj.__name__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
        raise ValueError(f"{_CONFIG_FIELD}={path!r} is {what}, not a transformers PretrainedConfig "
                         f"subclass; {_EXAMPLE}")
    return obj


def _data_size_kwargs(cls: type, given: Mapping[str, Any], *, vocab_size: int,
                      block_size: int) -> dict[str, int]:
    """Config kwargs setting the vocabulary and position-table sizes from the data, for the fields
    ``cls`` has (probed on a default instance; an alias in ``attribute_map``, like GPT-2's
    max_position_embeddings -> n_positions, is not set twice).

    A value the user gave in config_kwargs (under any of the names) is kept when it is at least the
    data's (a padded vocab or a longer position table is harmless) and rejected when smaller
    (out-of-range token ids or positions would fail inside the model)."""
    probe = cls()
    aliases = getattr(probe, "attribute_map", {})
    sizes = {}
    for fields, size, what in ((_VOCAB_FIELDS, vocab_size, "vocab_size"),
                               (_POSITION_FIELDS, block_size, "block_size")):
        present = [name for name in fields if hasattr(probe, name)]
        user = [name for name in present if name in given]
        for name in user:
            check_int_range(_KWARGS_FIELD, name, given[name], 1)
            if given[name] < size:
                raise ValueError(f"{_KWARGS_FIELD}.{name}={given[name]!r} is smaller than the data's "
                                 f"{what}={size}; leave it out (it is set from the data) or raise it")
        if not user:
            sizes.update((name, size) for name in present if name not in aliases)
    return sizes


def build_hf_causal_lm(config_class: str, config_kwargs: Mapping[str, Any], *, vocab_size: int,
                       block_size: int) -> HfCausalLM:
    """Build ``AutoModelForCausalLM.from_config(config_class(**config_kwargs))`` with random init.

    config_class: dotted path of a transformers config class (``"transformers.LlamaConfig"``);
    config_kwargs: its keyword arguments (plain dicts and lists: convert OmegaConf containers with
    ``OmegaConf.to_container`` first; transformers configs accept unknown keys silently, so a
    misspelt key is ignored); vocab_size / block_size: the data's vocabulary size and context
    length, set on the config's ``vocab_size`` and ``max_position_embeddings`` / ``n_positions``
    fields (see ``_data_size_kwargs``). ``dtype`` / ``torch_dtype`` are rejected: parameters are
    built in torch's default dtype (fp32 master weights) and the trainer's precision decides the
    GEMMs. The attention implementation is ``config_kwargs["attn_implementation"]`` if given,
    else "sdpa" (runs on CPU and CUDA), or "eager" for models without SDPA support. The KV cache
    is switched off (``use_cache=False``): it serves generation, not training.
    """
    transformers = _import_transformers()
    cls = _resolve_config_class(config_class, transformers)
    model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING.get(cls, None)  # `default` is required
    if model_class is None:
        raise ValueError(f"{_CONFIG_FIELD}={config_class!r}: transformers has no causal-LM model for "
                         f"{cls.__name__}; {_EXAMPLE}")
    check_int_range("build_hf_causal_lm", "vocab_size", vocab_size, 1)
    check_int_range("build_hf_causal_lm", "block_size", block_size, 1)
    kwargs = dict(config_kwargs)
    for name in _REJECTED_KWARGS:
        if name in kwargs:
            raise ValueError(f"{_KWARGS_FIELD}.{name}={kwargs[name]!r} is not allowed: parameters stay in "
                             "fp32 and the precision config group sets the compute precision")
    attn_implementation = kwargs.pop("attn_implementation", None)
    cfg = cls(**kwargs, **_data_size_kwargs(cls, kwargs, vocab_size=vocab_size, block_size=block_size))
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    if attn_implementation is None:
        attn_implementation = "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
    hf_model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)

    embedding = hf_model.get_input_embeddings()
    if embedding is not None and embedding.num_embeddings < vocab_size:
        raise ValueError(f"{_CONFIG_FIELD}={config_class!r} built a {embedding.num_embeddings}-token "
                         f"embedding for a {vocab_size}-token vocabulary: set its vocabulary field in "
                         f"{_KWARGS_FIELD}")
    model = HfCausalLM(hf_model, block_size=block_size)
    _warn_on_unconverted_layers(model, type(hf_model).__name__)
    return model


def _warn_on_unconverted_layers(model: HfCausalLM, name: str) -> None:
    """Warn where the converters' assumptions do not hold: GEMM layers that are not nn.Linear
    (GPT-2's Conv1D: convert_to_fp8 converts them, the bf16 emulation and TE do not), or an output
    head that is not the last nn.Linear registered."""
    conv1d = [fqn for fqn, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    if conv1d:
        warnings.warn(f"{name} computes with {len(conv1d)} transformers Conv1D layers (e.g. {conv1d[0]}), "
                      "which convert_to_fp8 converts but convert_to_bf16_emulated (precision=bf16 on CPU) and "
                      "convert_to_te do not convert: there they stay in full precision", UserWarning,
                      stacklevel=3)
    head = model.hf_model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if isinstance(head, nn.Linear) and linears and linears[-1] is not head:
        warnings.warn(f"{name}'s output head is not its last nn.Linear: convert_to_fp8's default "
                      "skip_output_head would keep another layer in high precision and convert the head",
                      UserWarning, stacklevel=3)
