"""FP8 collectives for torch's FSDP2 (``fully_shard``), through its public custom-comm hooks
(``FSDPModule.set_custom_reduce_scatter`` / ``set_custom_all_gather``): no fork, no patch of FSDP.

Layout FSDP2 hands a parameter group's collectives (one group per ``fully_shard`` call): every parameter
is cut along dim 0 into N pieces of ceil(dim0 / N) rows (zero padded), and rank r's slot is its pieces
of every parameter end to end, in the group's parameter order. ``group_segments`` rebuilds that order
and those sizes from the module (the parameters ``fully_shard`` manages: the module's own, minus those of
nested FSDP modules), and checks them against the buffer FSDP passes: a mismatch falls back to one scale
for the whole group (reduce-scatter) or to plain bytes (all-gather), never to a wrong split.

Reduce-scatter (``Fp8ReduceScatter``): the flat fp32 gradients of the group (N slots) go through
``fp8_reduce_scatter`` with the N pieces of each parameter in one scale group, so each PARAMETER gets one
power-of-two scale from its amax MAX-reduced over all ranks and all pieces (one all_reduce of the group's
amax vector), then an FP8 all-to-all and an fp32 sum in rank order divided by N (FSDP2 asks for AVG).
No requantization: the owner keeps the fp32 mean. An inf/NaN anywhere is ``found_inf`` on every rank
(the MAX-reduced amax); the output is then NaN, and the caller skips the step.

All-gather (``Fp8AllGather``): each ``Fp8Linear`` weight's shard travels as E4M3 codes at scales shared
by all ranks (``WeightGatherScales``: per block of the layer's forward layout, one scale for
``granularity="tensor"``, each block's amax MAX-reduced over the mesh once per step, for every FP8 weight in
one all_reduce, as torchao's precompute does); every other parameter travels as its own bytes. Every rank,
the sender included, decodes the same codes, so all ranks hold identical unsharded weights. With the
``current`` weight recipe the layer's own forward cast of the gathered weight is then exact: its values
lie on the E4M3 grid of the gather's scale, and the layer's scale (from the amax of those values, same
margin, same blocks) is that scale or finer (``WeightGatherScales`` says what the dgrad cast of "rowwise"
and "mx" sees). The wire carries 1 byte per FP8-weight element instead of 4; the scales' all_reduce adds
4 bytes per block (1/8 byte per element for "mx", little for the others), not counted in the gather's bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from fp8train._decode_cpu import decode_fp8_into
from fp8train.blocks import blocks_view, operand_block, resolve_block
from fp8train.cast import cast_to_fp8, cast_to_fp8_reference
from fp8train.comm.allreduce import fp8_reduce_scatter
from fp8train.comm.config import Fp8CommConfig
from fp8train.comm.stats import CommStats
from fp8train.formats import E4M3
from fp8train.linear import Fp8Linear
from fp8train.scaling import amax_to_log2_scale
from fp8train.tensor import expand_block_scales
from fp8train.weight_tensor import Fp8WeightTensor

__all__ = ["Fp8AllGather", "Fp8FsdpComm", "Fp8ReduceScatter", "WeightGatherScales", "group_segments",
           "register_fp8_fsdp_comm"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def group_segments(module: nn.Module, world_size: int,
                   names: dict[int, str] | None = None) -> list[tuple[str, nn.Parameter, int]]:
    """(name, parameter, padded shard numel) of each parameter ``fully_shard(module)`` manages, in its
    order: the module's parameters (depth first, each once) minus those under a nested FSDP module.
    ``names``: {id(parameter): name} to report (e.g. the root model's names); default: relative to module."""
    nested = [m for m in module.modules() if m is not module and isinstance(m, FSDPModule)]
    skip = {id(p) for m in nested for p in m.parameters()}
    out, seen = [], set()
    for name, p in module.named_parameters():
        if id(p) in skip or id(p) in seen:
            continue
        seen.add(id(p))
        rows = math.ceil(p.shape[0] / world_size) if p.dim() > 0 else 1
        out.append(((names or {}).get(id(p), name), p, rows * math.prod(p.shape[1:])))
    return out


@dataclass(kw_only=True, slots=True)
class Fp8FsdpComm:
    """What the FP8 collectives of one FSDP2 model did since the last ``pop_stats``: the gradient
    reduce-scatters' ``CommStats`` (merged, per parameter) and the bytes the weight all-gathers sent in
    training mode (an evaluation's forward gathers too, but is not a training step's traffic)."""

    stats: CommStats = field(default_factory=CommStats)
    weight_bytes_sent: int = 0

    def pop_stats(self) -> tuple[CommStats, int]:
        stats, weight_bytes = self.stats, self.weight_bytes_sent
        self.stats, self.weight_bytes_sent = CommStats(), 0
        return stats, weight_bytes


class _Alloc:
    """FSDP2's custom comms are duck-typed (``allocate`` + ``__call__``, the interface of its ``AllGather`` /
    ``ReduceScatter``, which torch does not export): plain buffers from the default allocator."""

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class Fp8ReduceScatter(_Alloc):
    """FSDP2 gradient reduce-scatter in FP8 for one parameter group (module docstring)."""

    def __init__(self, segments: list[tuple[str, nn.Parameter, int]], config: Fp8CommConfig, sink: Fp8FsdpComm):
        self.names = [name for name, _, _ in segments]
        self.numels = [numel for _, _, numel in segments]
        self.config, self.sink = config, sink

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: object, async_op: bool = False) -> None:
        world = group.size()
        if op not in (dist.ReduceOp.AVG, dist.ReduceOp.SUM):
            raise ValueError(f"Fp8ReduceScatter: reduce op {op} is not supported; allowed: AVG, SUM "
                             "(leave fully_shard's gradient divide factor at its default)")
        slot = input_tensor.numel() // world
        per_param = sum(self.numels) == slot
        numels = self.numels if per_param else [slot]  # sizes FSDP did not lay out as expected: one scale
        pieces, groups = [], []
        for r in range(world):
            start = r * slot
            for i, n in enumerate(numels):
                pieces.append(input_tensor[start:start + n])
                groups.append(i)
                start += n
        mean, stats = fp8_reduce_scatter(pieces, [r * slot for r in range(world + 1)], config=self.config,
                                         group=group, scale_groups=groups)
        if mean is None:  # inf/NaN on some rank: the same verdict everywhere; the caller skips the step
            output_tensor.fill_(float("nan"))
        else:
            output_tensor.copy_(mean if op == dist.ReduceOp.AVG else mean * world)
        k = len(numels)  # the scales of rank 0's pieces ARE the parameters' scales (one per group)
        stats.log2_scales, stats.grad_amax = stats.log2_scales[:k], stats.grad_amax[:k]
        stats.tensor_names = tuple(self.names) if per_param else ()
        self.sink.stats = self.sink.stats.merge(stats)


class WeightGatherScales:
    """Scales of the FP8 weights' all-gathers, the same on every rank: per ``Fp8Linear`` weight, one
    power-of-two scale per block of its FORWARD layout (``blocks.operand_block(granularity, "weight", 1)``:
    the whole tensor for "tensor", a row for "rowwise", 128 x 128 for "block", 1 x 32 for "mx"), by the
    rule of ``blocks.quantize_blocks`` (an all-zero block takes the tensor's bias). ``refresh_`` computes
    each block's amax from the local shard rows (FSDP2 shards dim 0: rank r holds rows r*R .. r*R+R-1,
    R = ceil(out / N); a 128-row block may span ranks) and MAX-reduces all of them over the mesh in one
    all_reduce, after each optimizer step (the weights do not change between steps).

    Why the forward layout: the layer's own forward cast of the gathered weight then finds each block's
    values on the E4M3 grid of the gather's scale with an amax that maps at most to 448 * 2**-margin, so its
    scale is the gather's or finer and the cast is exact: the forward GEMM sees the values a cast of the
    high-precision weight gives ("block": the dgrad GEMM too, its cast is the same). "rowwise" and "mx"
    cast the weight again along the other dim for dgrad; that cast rounds the gathered values, which can
    differ from rounding the high-precision ones where the first rounding moved a value onto or across a
    midpoint of the coarser grid (a tie case, at most one ulp there)."""

    def __init__(self, layers: dict[nn.Parameter, Fp8Linear], group: dist.ProcessGroup | None) -> None:
        self.params = list(layers)
        self.margin = {p: layers[p].config.margin for p in self.params}
        self.block = {p: resolve_block(operand_block(layers[p].config.granularity, "weight", 1)
                                       if layers[p].config.granularity != "tensor" else (0, 0), p.shape)
                      for p in self.params}
        self.group = group
        self.log2_scale: dict[nn.Parameter, torch.Tensor] = {}  # (ceil(out/rows), ceil(in/cols)) biases

    def _grid_shape(self, p: nn.Parameter) -> tuple[int, int]:
        rows, cols = self.block[p]
        return -(-p.shape[0] // rows), -(-p.shape[1] // cols)

    def _local_amax_grid(self, p: nn.Parameter, world: int, rank: int) -> torch.Tensor:
        """The amax of each block over this rank's rows of ``p`` (0 where it holds none of a block)."""
        rows, cols = self.block[p]
        grid = torch.zeros(self._grid_shape(p), dtype=torch.float32, device=p.device)
        shard = _local(p).detach().to(torch.float32)
        if shard.numel() == 0:
            return grid
        first = rank * math.ceil(p.shape[0] / world)  # the shard's first row in the whole weight
        lead = first % rows                           # rows of its first block held by lower ranks
        amax = blocks_view(torch.nn.functional.pad(shard, (0, 0, lead, 0)), self.block[p]).abs().amax(dim=(1, 3))
        grid[first // rows: first // rows + amax.shape[0]] = amax
        return grid

    @torch.no_grad()
    def refresh_(self) -> None:
        if not self.params:
            return
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        grids = [self._local_amax_grid(p, world, rank) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grids])
        flat = torch.where(torch.isnan(flat), torch.full_like(flat, float("inf")), flat)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.group)
        for p, amax in zip(self.params, flat.split([g.numel() for g in grids])):
            amax = amax.reshape(self._grid_shape(p))
            tensor_bias = amax_to_log2_scale(amax.max(), E4M3, margin=self.margin[p])
            self.log2_scale[p] = amax_to_log2_scale(amax, E4M3, margin=self.margin[p],
                                                    prev_log2_scale=tensor_bias.expand_as(amax))

    def element_log2_scale(self, p: nn.Parameter, first_row: int, n_rows: int) -> torch.Tensor:
        """(n_rows, in) the bias of each element of rows first_row .. first_row + n_rows - 1 of ``p`` (rows
        past its end, FSDP2's padding, get 0); 0-d for a per-tensor scale."""
        grid = self.log2_scale[p]
        if grid.numel() == 1:
            return grid.reshape(())
        rows, cols = self.block[p]
        last = min(first_row + n_rows, p.shape[0])
        out = torch.zeros(n_rows, p.shape[1], dtype=torch.float32, device=grid.device)
        if last > first_row:
            lo, hi = first_row // rows, -(-last // rows)
            full = expand_block_scales(grid[lo:hi], (rows, cols), ((hi - lo) * rows, p.shape[1]))
            out[: last - first_row] = full[first_row - lo * rows: last - lo * rows]
        return out


class Fp8AllGather(_Alloc):
    """FSDP2 weight all-gather for one parameter group: FP8 weights as E4M3 codes, the rest as bytes."""

    def __init__(self, segments: list[tuple[str, nn.Parameter, int]], scales: WeightGatherScales, sink: Fp8FsdpComm,
                 module: nn.Module | None = None):
        self.module = module  # its ``training`` flag: the gathers of an evaluation are not counted
        self.params = [p for _, p, _ in segments]
        self.numels = [numel for _, _, numel in segments]
        self.scales, self.sink = scales, sink

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> None:
        world, rank = group.size(), group.rank()
        n, item = input_tensor.numel(), input_tensor.element_size()
        # FSDP2 packs a group of mixed dtypes (FP8 primary weights' codes beside bf16 norms) as uint8 bytes
        laid_out = sum(self.numels) == n and input_tensor.dtype != torch.uint8
        fp8 = [p in self.scales.log2_scale for p in self.params] if laid_out else []
        if not any(fp8):  # nothing to encode (FP8 primary weights' codes, norms, embeddings): bytes as they are
            dist.all_gather_into_tensor(output_tensor, input_tensor, group=group)
            if self.module is None or self.module.training:
                self.sink.weight_bytes_sent += (world - 1) * n * item
            return
        numels = self.numels
        wire = [m if q else m * item for m, q in zip(numels, fp8)]  # bytes of each piece in a rank's slot
        payload = torch.empty(sum(wire), dtype=torch.uint8, device=input_tensor.device)
        src = dst = 0
        for i, (m, w) in enumerate(zip(numels, wire)):
            piece = input_tensor[src:src + m]
            if fp8[i]:
                self._encode(i, piece, rank, world, payload[dst:dst + w].view(E4M3.dtype))
            else:
                payload[dst:dst + w].copy_(piece.contiguous().view(torch.uint8))
            src, dst = src + m, dst + w
        gathered = torch.empty(world * payload.numel(), dtype=torch.uint8, device=payload.device)
        dist.all_gather_into_tensor(gathered, payload, group=group)
        if self.module is None or self.module.training:
            self.sink.weight_bytes_sent += (world - 1) * payload.numel()
        for r in range(world):  # every rank's slot decoded, this rank's too: identical weights everywhere
            src, dst = r * payload.numel(), r * n
            for i, (m, w) in enumerate(zip(numels, wire)):
                out = output_tensor[dst:dst + m]
                if fp8[i]:
                    self._decode(i, gathered[src:src + w], r, world, out)
                else:
                    out.view(torch.uint8).copy_(gathered[src:src + w])
                src, dst = src + w, dst + m

    def _scales(self, i: int, rank: int, world: int, numel: int) -> tuple[torch.Tensor, int]:
        """Per-element biases of parameter i's piece on ``rank`` (0-d: one for the tensor), and its row width."""
        p = self.params[i]
        cols = p.shape[1] if p.dim() == 2 else numel
        return self.scales.element_log2_scale(p, rank * math.ceil(p.shape[0] / world), numel // cols), cols

    def _encode(self, i: int, piece: torch.Tensor, rank: int, world: int, codes: torch.Tensor) -> None:
        log2_scale, cols = self._scales(i, rank, world, piece.numel())
        if log2_scale.dim() == 0:
            cast_to_fp8(piece, torch.exp2(log2_scale), E4M3, out=codes)
        else:  # finer scales: the reference cast with each element's scale (a power of two: exact)
            codes.copy_(cast_to_fp8_reference(piece.view(-1, cols), torch.exp2(log2_scale), E4M3).view(-1))

    def _decode(self, i: int, codes: torch.Tensor, rank: int, world: int, out: torch.Tensor) -> None:
        log2_scale, cols = self._scales(i, rank, world, out.numel())
        if log2_scale.dim() == 0:
            decode_fp8_into(codes, E4M3, torch.exp2(-log2_scale), out)
        else:  # code * 2**-bias in fp32: exact
            values = codes.view(E4M3.dtype).view(-1, cols).to(torch.float32) * torch.exp2(-log2_scale)
            out.copy_(values.view(-1))


def register_fp8_fsdp_comm(model: nn.Module, world_size: int, *, grad_config: Fp8CommConfig | None,
                           fp8_weight_gather: bool, group: dist.ProcessGroup | None = None
                           ) -> tuple[Fp8FsdpComm, WeightGatherScales | None]:
    """Install the FP8 collectives on every FSDP module of ``model`` (after ``fully_shard``):
    gradients reduce-scattered in FP8 when ``grad_config`` is given, ``Fp8Linear`` weights all-gathered in
    FP8 when ``fp8_weight_gather`` (an FP8 primary weight, ``Fp8WeightTensor``, is already FP8: its bytes
    travel as they are, and are counted). Returns the stats sink and the gather scales (refreshed here once; the
    caller refreshes them after every optimizer step)."""
    sink = Fp8FsdpComm()
    layers = {m.weight: m for m in model.modules() if isinstance(m, Fp8Linear)
              and not isinstance(_local(m.weight), Fp8WeightTensor)} if fp8_weight_gather else {}
    scales = WeightGatherScales(layers, group) if fp8_weight_gather else None
    names = {id(p): name for name, p in model.named_parameters()}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        segments = group_segments(module, world_size, names)
        if grad_config is not None:
            module.set_custom_reduce_scatter(Fp8ReduceScatter(segments, grad_config, sink))
        if scales is not None:
            module.set_custom_all_gather(Fp8AllGather(segments, scales, sink, module))
    if scales is not None:
        scales.refresh_()
    return sink, scales
