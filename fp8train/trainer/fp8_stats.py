"""FP8 scale dynamics of a model as named metrics (what the trainer logs every ``monitor.every`` steps).

Key: ``fp8/{layer_type}/{role}/{stat}/L{layer}``, so a dashboard groups by linear type and role and
draws one line per decoder layer:
  layer_type  qkv, q, k, v, attn_out, ffn_in, ffn_gate, ffn_up, ffn_out (known projections of the
              GPT, Llama and HF Llama-family models), else the layer's own name;
  layer       the decoder layer's index (the first integer in the module's name), "-" if none;
  role        input, weight, grad_output (the three casts of an Fp8Linear), wgrad (the weight
              gradient: the scale the FP8 gradient communication used, scaling_bias only), m, v,
              master (Fp8AdamW state);
  stat        scaling_bias (log2 of the power-of-two scale: the Graphcore paper's scaling bias), amax,
              saturated_frac (elements clamped to the format's max), underflow_frac (non-zero
              elements that became 0, over the non-zero elements); with finer scales
              (``Fp8Config.granularity`` != "tensor"; scaling_bias is then the tensor's, i.e. its
              largest block's) also block_bias_min / block_bias_median / block_bias_max, the
              spread of the per-row/block biases (min and max over the sampled step's casts,
              median of its last cast), on sampled steps.
Cast roles report rank 0's tensors (each rank scales its own activations); the bias is the one in
effect for the last cast (delayed recipe: the next cast's). Collecting costs one host transfer per
group of metrics; counting saturation/underflow costs a few passes per cast, on sampled steps only.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from fp8train.linear import Fp8Linear
from fp8train.scaling_state import ScalingState

__all__ = ["BLOCK_STATS", "CAST_ROLES", "STATS", "arm_cast_stats", "bias_histograms", "cast_metrics", "layer_key",
           "optimizer_metrics", "parse_key", "wgrad_metrics"]

CAST_ROLES = ("input", "weight", "grad_output")
STATS = ("scaling_bias", "amax", "saturated_frac", "underflow_frac")
BLOCK_STATS = ("block_bias_min", "block_bias_median", "block_bias_max")  # finer granularities only

# module-name suffixes of the known projections -> canonical linear type
_LAYER_TYPES = {
    "attn.c_attn": "qkv", "attn.c_proj": "attn_out", "mlp.c_fc": "ffn_in", "mlp.c_proj": "ffn_out",  # GPT
    "attn.wq": "q", "attn.wk": "k", "attn.wv": "v", "attn.wo": "attn_out",  # Llama (fp8train.models)
    "mlp.w1": "ffn_gate", "mlp.w3": "ffn_up", "mlp.w2": "ffn_out",
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_out",  # HF Llama family
}
_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


def layer_key(fqn: str) -> tuple[str, str]:
    """(layer_type, layer) of a module name, e.g. "h.3.attn.c_attn" -> ("qkv", "L3")."""
    match = _INDEX.search(fqn + ".")
    layer = f"L{match.group(1)}" if match else "-"
    suffix = fqn[match.end():] if match else fqn
    return _LAYER_TYPES.get(suffix, suffix.replace(".", "_") or "model"), layer


def _fp8_layers(model: nn.Module) -> list[tuple[str, Fp8Linear]]:
    return [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, Fp8Linear)]


def arm_cast_stats(model: nn.Module, on: bool) -> None:
    """Start (zeroed) or stop counting saturation/underflow in every ScalingState of ``model``."""
    for m in model.modules():
        if isinstance(m, ScalingState):
            if on:
                m.reset_stats()
            m.sample_stats = on


def _collect(entries: list[tuple[str, torch.Tensor]]) -> dict[str, float]:
    if not entries:
        return {}
    values = torch.stack([v.detach().to(torch.float64).reshape(()).cpu() for _, v in entries]).tolist()
    return dict(zip((k for k, _ in entries), values))


def _frac(count: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return count.to(torch.float64) / total.clamp(min=1).to(torch.float64)


def cast_metrics(model: nn.Module) -> dict[str, float]:
    """Scaling bias and amax of every cast role; saturation/underflow fractions when counted (see
    ``arm_cast_stats``)."""
    entries = []
    for fqn, layer in _fp8_layers(model):
        layer_type, idx = layer_key(fqn)
        for role in CAST_ROLES:
            state: ScalingState = getattr(layer, f"{role}_scaling")
            base = f"fp8/{layer_type}/{role}"
            entries += [(f"{base}/scaling_bias/{idx}", state.log2_scale), (f"{base}/amax/{idx}", state.amax_history[0])]
            if int(state.stat_numel) > 0:
                entries += [(f"{base}/saturated_frac/{idx}", _frac(state.stat_saturated, state.stat_numel)),
                            (f"{base}/underflow_frac/{idx}", _frac(state.stat_underflowed, state.stat_nonzero))]
                if layer.config.granularity != "tensor":
                    entries += [(f"{base}/{stat}/{idx}", state.stat_block_bias[i])
                                for i, stat in enumerate(BLOCK_STATS)]
    return _collect(entries)


def wgrad_metrics(model: nn.Module, grad_log2_scales: dict[str, float]) -> dict[str, float]:
    """The scaling bias the FP8 gradient communication used for the weight of every Fp8Linear, from
    ``grad_log2_scales`` ({parameter name: bias}, e.g. ``CommStats.log2_scales_by_name()``: the bias
    of the amax MAX-reduced over ranks, identical on every rank). Reported, not recomputed: ``.grad``
    is the reduced mean under DDP and this rank's local gradient under ZeRO, and neither sets the
    scale that went on the wire. Layers whose weight is not in ``grad_log2_scales`` (native
    communication, a step skipped for overflow) are left out."""
    out = {}
    for fqn, _ in _fp8_layers(model):
        bias = grad_log2_scales.get(f"{fqn}.weight")
        if bias is not None:
            layer_type, idx = layer_key(fqn)
            out[f"fp8/{layer_type}/wgrad/scaling_bias/{idx}"] = float(bias)
    return out


def optimizer_metrics(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
    """Scaling bias of Fp8AdamW's m, v and master for the Fp8Linear weights this optimizer holds
    (a ZeRO rank holds only its owned parameters: merge the ranks' dicts)."""
    if optimizer is None or not hasattr(optimizer, "log2_scales"):
        return {}
    names = {id(layer.weight): fqn for fqn, layer in _fp8_layers(model)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scales = optimizer.log2_scales()
    out = {}
    for slot, role in (("exp_avg", "m"), ("exp_avg_sq", "v"), ("master", "master")):
        for p, bias in zip(params, scales[slot].tolist()):
            if id(p) in names and bias == bias:  # NaN: no state yet
                layer_type, idx = layer_key(names[id(p)])
                out[f"fp8/{layer_type}/{role}/scaling_bias/{idx}"] = bias
    return out


def bias_histograms(metrics: dict[str, float]) -> dict[str, list[float]]:
    """Scaling biases grouped across layers: {"fp8_hist/{layer_type}/{role}": [bias per layer]}."""
    groups: dict[str, list[float]] = defaultdict(list)
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 5 and parts[0] == "fp8" and parts[3] == "scaling_bias":
            groups[f"fp8_hist/{parts[1]}/{parts[2]}"].append(value)
    return dict(groups)


def parse_key(key: str) -> tuple[str, str, str, str] | None:
    """(layer_type, role, stat, layer) of a metric key, or None for other keys."""
    parts = key.split("/")
    return (parts[1], parts[2], parts[3], parts[4]) if len(parts) == 5 and parts[0] == "fp8" else None

