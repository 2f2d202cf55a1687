"""Building a run's model and optimizer from its config (random init; nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fp8train.errors import ConfigError
from fp8train.models import GPT, Llama
from fp8train.models.gpt import GPTConfig
from fp8train.models.llama import LlamaConfig
from fp8train.optim import Fp8AdamWConfig
from fp8train.trainer.config import HfModelConfig, ModelConfig, TrainConfig

__all__ = ["build_model", "build_optimizer", "count_parameters"]


def build_model(cfg: ModelConfig, *, seed: int, device: torch.device) -> nn.Module:
    """The model with weights drawn from ``seed`` (identical on every rank), on ``device``, in fp32.
    Its ``forward(idx, targets)`` returns ``(logits, loss)``."""
    torch.manual_seed(seed)
    spec = cfg.spec
    if isinstance(spec, GPTConfig):
        model: nn.Module = GPT(spec)
    elif isinstance(spec, LlamaConfig):
        model = Llama(spec)
    elif isinstance(spec, HfModelConfig):
        from fp8train.models.hf import build_hf_causal_lm  # transformers is an optional extra

        kwargs = {k: v for k, v in spec.config.items() if k != "_target_"}
        try:
            model = build_hf_causal_lm(spec.config["_target_"], kwargs, vocab_size=spec.vocab_size,
                                       block_size=spec.block_size)
        except (ValueError, ImportError) as e:  # a bad class path or kwargs: the config's fault
            raise ConfigError(str(e).splitlines()[0]) from None
    else:  # unreachable: ModelConfig.spec is typed
        raise TypeError(f"unknown model spec {type(spec).__name__}")
    return model.to(device)


def count_parameters(model: nn.Module) -> int:
    """Elements of every parameter, whole: DeepSpeed ZeRO-3 leaves each an empty placeholder with its
    full size in ``ds_numel``; an FSDP2 DTensor's numel is already the whole tensor's."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def _param_groups(params: Iterable[nn.Parameter], weight_decay: float,
                  names: Mapping[nn.Parameter, str] | None) -> list[dict[str, Any]]:
    """Weight decay on matrices (Linear weights, embeddings), none on vectors (biases, norm gains):
    decaying a gain towards 0 only fights the normalisation it scales. With ``names``, each group
    carries its ``param_names`` (torch's named param groups)."""
    params = list(params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if names is not None:
        for g in groups:
            g["param_names"] = [names[p] for p in g["params"]]
    return [g for g in groups if g["params"]]


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, *,
                    fp8_weights: Mapping[nn.Parameter, Any] | None = None,
                    names: Mapping[nn.Parameter, str] | None = None) -> torch.optim.Optimizer:
    """torch AdamW or Fp8AdamW (``precision.optimizer``) over ``params`` with ``optim``'s settings;
    the learning rate is set every step by the schedule. ``fp8_weights``: {parameter: Fp8Linear}
    of FP8 primary weights, those of ``params`` handed to Fp8AdamW. ``names``: {parameter: its name
    in the model}: Fp8AdamW keys its stochastic rounding by name, so that a replicated run and ZeRO
    at any world size draw the same random bits for a parameter."""
    o = cfg.optim
    params = list(params)
    groups = _param_groups(params, o.weight_decay, names)
    if cfg.precision.optimizer == "fp8_adamw":
        s = cfg.precision.optim_state
        return Fp8AdamWConfig(lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay,
                              exp_avg_dtype=s.exp_avg_dtype, exp_avg_sq_dtype=s.exp_avg_sq_dtype,
                              master_dtype=s.master_dtype, rounding=s.rounding,
                              seed=cfg.seed % 2**32).build(groups, fp8_weights={
                                  p: fp8_weights[p] for p in params if p in (fp8_weights or {})})
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
