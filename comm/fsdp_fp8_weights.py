"""FP8 primary weights under FSDP2 (``parallel=fsdp2`` with ``precision.fp8_weights``): each
``Fp8Linear`` weight is a parameter holding an ``Fp8WeightTensor`` (fp8train/weight_tensor.py), so FSDP2
keeps 1 byte per element of each rank's shard and all-gathers those bytes; the master lives only in
``Fp8AdamW``.

Lifecycle:
  1. ``to_fp8_weight_params_(model, rank, world_size)``, before ``fully_shard``: each
     ``Fp8Linear(fp8_weight=True)`` (``convert_to_fp8(fp8_weights=True)``) gives up its codes buffers
     (``weight_codes``, ``weight_scale_inv``) and its weight Parameter becomes an ``Fp8WeightTensor``
     over those very codes (the layer's recipe cast them from the whole weight, identical on every
     rank); the layer is then a plain ``Fp8Linear`` whose weight already is FP8 (its forward reads the
     codes without a cast). Kept aside: this rank's rows of the high-precision weight, the rows FSDP2
     will give it (rank r: r*R .. r*R+R-1, R = ceil(rows / N)), for the optimizer's master to start from,
     as it starts from the high-precision parameter under ddp / ZeRO; dropped when the master exists.
  2. ``Fp8ShardedWeights(layers, group)`` after ``fully_shard``: ``sinks()`` maps each sharded parameter
     to the ``Fp8WeightSink`` (optim/_fp8_weights.py) that ``Fp8AdamW(fp8_weights=...)`` writes through.
  3. Each step: ``Fp8AdamW`` writes every new weight (the master rounded to the parameter's dtype) into
     the consumed gradient's shard and hands it to the sink, which keeps it; once all are written,
     ``commit_`` computes each shard's amax, MAX-reduces all of them over the mesh in ONE all_reduce,
     and casts each shard with the scale of the whole tensor's amax: the per-tensor ``current`` cast
     of the layer's weight recipe (same margin; an amax of 0 keeps the previous scale), so every shard
     has the same scale, the gathered codes equal the cast of the whole weight, and the layer's
     ``weight_scaling`` records that cast on every rank (the amax and bias monitoring reads).

Restrictions, checked here with one-line errors (fp8train/trainer/config.py checks them first):
granularity "tensor" (one scale per tensor: a finer scale's blocks would have to be sharded with the
rows) and recipe "current" (the cast above).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from fp8train.formats import E4M3
from fp8train.linear import Fp8Linear
from fp8train.optim._sharded import like_param, local, sync_max_
from fp8train.scaling import amax_to_log2_scale, tensor_to_amax
from fp8train.weight_tensor import Fp8WeightTensor

__all__ = ["Fp8ShardedWeights", "to_fp8_weight_params_"]


def _check_layer(name: str, layer: Fp8Linear) -> None:
    if layer.config.granularity != "tensor":
        raise ValueError(f"{name}: FP8 primary weights under fsdp2 need precision.fp8.granularity='tensor' (got "
                         f"{layer.config.granularity!r}): one scale per shard-able tensor; allowed: tensor")
    if layer.config.recipe != "current":
        raise ValueError(f"{name}: FP8 primary weights under fsdp2 need precision.fp8.recipe='current' (got "
                         f"{layer.config.recipe!r}): the shards agree on the whole tensor's amax; allowed: current")


@torch.no_grad()
def to_fp8_weight_params_(model: nn.Module, rank: int, world_size: int) -> dict[Fp8Linear, torch.Tensor]:
    """Step 1 of the module docstring, in place; returns {layer: this rank's rows of its high-precision
    weight} (a copy, to start the master from). Call before ``fully_shard``."""
    shards = {}
    for name, layer in model.named_modules():
        if not (isinstance(layer, Fp8Linear) and layer.fp8_weight):
            continue
        _check_layer(name, layer)
        if not layer.holds_high_precision_weight:
            raise ValueError(f"{name}: its high-precision weight was already released to an optimizer; convert "
                             "to FSDP2 FP8 weights before building the optimizer")
        weight = layer.weight
        rows = -(-weight.shape[0] // world_size)
        shards[layer] = weight.detach()[rank * rows: (rank + 1) * rows].clone()
        codes, scale_inv = layer.weight_codes, layer.weight_scale_inv
        del layer.weight_codes, layer.weight_scale_inv  # buffers: the parameter holds the codes now
        layer.fp8_weight = False
        layer.weight = nn.Parameter(Fp8WeightTensor(codes, scale_inv.to(torch.float32).reshape(()), weight.dtype),
                                    requires_grad=weight.requires_grad)
        layer.register_state_dict_post_hook(_plain_weight_entry)
    return shards


def _plain_weight_entry(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """In a state_dict (and so in torch.distributed.checkpoint's files) an FP8 weight is its dequantized
    values in the reported dtype, exact (code * scale_inv): a plain tensor any configuration loads, at any
    world size; loading it into an ``Fp8WeightTensor`` recovers the codes (``Fp8ShardedWeights.requantize_``)."""
    key = f"{prefix}weight"
    value = state_dict.get(key)
    if isinstance(value, DTensor) and isinstance(value.to_local(), Fp8WeightTensor):
        state_dict[key] = like_param(value.to_local().dequantize(), value)
    elif isinstance(value, Fp8WeightTensor):
        state_dict[key] = value.dequantize()


class _ShardSink:
    """The ``Fp8WeightSink`` of one sharded FP8 weight: the optimizer's view of it (module docstring)."""

    def __init__(self, owner: Fp8ShardedWeights, layer: Fp8Linear, param: DTensor,
                 high_precision_shard: torch.Tensor | None) -> None:
        self.owner, self.layer, self.param = owner, layer, param
        self._high_precision_shard = high_precision_shard

    @property
    def holds_high_precision_weight(self) -> bool:
        return self._high_precision_shard is not None

    @property
    def high_precision_weight(self) -> torch.Tensor:
        if self._high_precision_shard is None:
            raise RuntimeError("the high-precision shard was released; the optimizer's master holds it")
        return self._high_precision_shard

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return local(self.param).dequantize(dtype)

    def release_high_precision_(self) -> None:
        self._high_precision_shard = None

    def set_weight_(self, weight_hp: torch.Tensor) -> None:
        self.owner.pending.append((self, local(weight_hp)))

    @property
    def commit_group(self) -> Fp8ShardedWeights:
        return self.owner


class Fp8ShardedWeights:
    """The FSDP2 FP8 primary weights of one model: their optimizer sinks and the per-step scale agreement
    (module docstring)."""

    def __init__(self, high_precision_shards: dict[Fp8Linear, torch.Tensor], group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.pending: list[tuple[_ShardSink, torch.Tensor]] = []
        self._sinks = []
        for layer, shard in high_precision_shards.items():
            param = layer.weight
            if not (isinstance(param, DTensor) and isinstance(param.to_local(), Fp8WeightTensor)):
                raise ValueError("Fp8ShardedWeights: build it after fully_shard, on layers converted by "
                                 "to_fp8_weight_params_")
            self._sinks.append(_ShardSink(self, layer, param, shard))

    def sinks(self) -> dict[torch.Tensor, _ShardSink]:
        """{sharded parameter: its sink}: ``Fp8AdamW(fp8_weights=...)``."""
        return {sink.param: sink for sink in self._sinks}

    @torch.no_grad()
    def commit_(self, *, record: bool = True) -> None:
        """Cast every new weight handed over since the last commit at its whole tensor's scale (module
        docstring, step 3). Collective over ``group``: every rank commits the same parameters.
        ``record``: the layers' ``weight_scaling`` records the casts (not for ``requantize_``)."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        amax = torch.stack([tensor_to_amax(w) for _, w in pending])  # this rank's rows (0 for none)
        sync_max_([amax], self.group)
        counts = {}  # sampled cast statistics (monitor.every): this rank's rows, summed over the mesh below
        for i, ((sink, weight), tensor_amax) in enumerate(zip(pending, amax.unbind(0))):
            scaling = sink.layer.weight_scaling
            log2_scale = amax_to_log2_scale(tensor_amax, E4M3, margin=scaling.margin,
                                            prev_log2_scale=scaling.log2_scale)
            shard = local(sink.param)
            shard.store_(weight, log2_scale)
            if record:
                scaling.record_cast_(tensor_amax, log2_scale)
                if scaling.sample_stats:
                    counts[i] = scaling.cast_counts(weight, torch.exp2(log2_scale), shard.codes, E4M3)
        if counts:  # every rank samples the same steps: one SUM all_reduce
            summed = torch.stack(list(counts.values()))
            if self.group is not None:
                dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.group)
            for i, row in zip(counts, summed.unbind(0)):
                pending[i][0].layer.weight_scaling.add_cast_counts_(row)

    @torch.no_grad()
    def requantize_(self) -> None:
        """Re-agree every weight's scale over the mesh from its current values (after loading a checkpoint,
        whose copy cast each shard at its own amax): the values, already on an E4M3 grid, are kept exactly."""
        for sink in self._sinks:
            sink.set_weight_(local(sink.param).dequantize(torch.float32))
        self.commit_(record=False)
