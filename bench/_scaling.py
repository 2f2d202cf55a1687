"""Projection of the gradient-sync and weight-gather share of a training step past this machine, on paper:
the model of bench/comm_model.py (time = latency per hop + bytes / bandwidth, plus the FP8 codec's cost
per element) with H100-class parameters in place of the netns link's. Every input is a field below, printed
with the tables (docs/scaling.md); nothing here is measured.

Collectives, S elements per GPU of b bytes, N GPUs in nodes of g, M = N / g nodes, one NIC per GPU:
  reduce-scatter / all-gather, hierarchical: an NVLink stage inside the node, (g-1) hops and (g-1)/g S b
    bytes, then a stage between nodes among the GPUs of one local index, (M-1) hops and (M-1)/M S b / g
    bytes per NIC;
  flat ring: one ring over all N GPUs, g channels (one per NIC) so each NIC carries (N-1)/N S b / g bytes,
    but every one of the N-1 steps waits on a hop between nodes;
  all-reduce: reduce-scatter then all-gather. FP8 adds one amax all-reduce per call (a tree over the
    network: 2 log2(N) hops of latency, its bytes negligible).
FP8 codec on the GPU: HBM bytes touched per element of S over the HBM bandwidth (not fused into a GEMM,
as comm/ does it): reduce-scatter 6 B (amax read 2, cast read 2 + write 1, decode-sum read 1; the fp32
shard write is 4/N) plus 6/g B for the requantized partial sum between the two hierarchical stages; an
all-reduce adds 3 B (decode of the gathered codes, read 1 + write 2); an all-gather of FP8 weights 0 (the
FP8 GEMM reads the gathered codes; the shard is already FP8 with FP8 primary weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["Cluster", "LlamaShape", "LLAMA_8B", "LLAMA_70B", "Projection", "project", "assumption_rows",
           "codec_seconds_per_element", "collective_seconds"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Cluster:
    """H100-class nodes; each field is an assumption, stated in docs/scaling.md."""

    gpus_per_node: int = 8            # DGX/HGX H100: 8 GPUs on NVLink 4
    nic_gbit: float = 400.0           # one 400 Gbit/s NIC per GPU (8 per node), the link between nodes
    nic_efficiency: float = 0.9       # fraction of the line rate a large collective reaches (NCCL-class)
    nvlink_gbyte_s: float = 450.0     # NVLink 4 per GPU and direction
    nvlink_efficiency: float = 0.8
    net_hop_latency_s: float = 5e-6   # per ring step between nodes
    nvlink_hop_latency_s: float = 1e-6
    hbm_gbyte_s: float = 3350.0       # H100 SXM HBM3
    hbm_efficiency: float = 0.7       # what an elementwise codec kernel reaches
    peak_tflops: float = 989.0        # dense bf16 (FP8 GEMMs would shorten compute and raise every share)
    mfu: float = 0.40                 # model FLOPs utilisation of the compute
    tokens_per_gpu: int = 8192        # per optimizer step: one 8192-token sequence, no accumulation
    overlap: float = 0.8              # comm can hide behind at most this fraction of its phase's compute
    ddp_bucket_bytes: int = 25 * 2**20  # DDP's default bucket_cap_mb, bf16 gradients
    zero_bucket_elements: int = 500_000_000  # DeepSpeed's reduce_bucket_size / allgather_bucket_size defaults
    hbm_gbytes: float = 80.0          # memory per GPU, for the model-state column


@dataclass(frozen=True, kw_only=True, slots=True)
class LlamaShape:
    name: str
    params: float
    layers: int
    d_model: int
    vocab: int
    seq: int = 8192

    @property
    def linear_fraction(self) -> float:
        """Parameters in the blocks' linears (FP8 weights); embedding and head stay bf16."""
        return 1 - 2 * self.vocab * self.d_model / self.params

    def flops_per_token(self) -> float:
        # 6 P for the matmuls (forward + backward) + causal attention 6 L d seq (half of 12 L d seq)
        return 6 * self.params + 6 * self.layers * self.d_model * self.seq


LLAMA_8B = LlamaShape(name="Llama 8B", params=8.03e9, layers=32, d_model=4096, vocab=128256)
LLAMA_70B = LlamaShape(name="Llama 70B", params=70.6e9, layers=80, d_model=8192, vocab=128256)


def _stage(hops: int, nbytes: float, latency_s: float, bytes_per_s: float) -> float:
    return hops * latency_s + nbytes / bytes_per_s


def _half_collective(elements: float, nbytes: float, n: int, c: Cluster, flat: bool) -> float:
    """Seconds of one reduce-scatter or all-gather of ``elements`` per GPU at ``nbytes`` bytes each."""
    g = min(c.gpus_per_node, n)
    nic = c.nic_gbit / 8 * 1e9 * c.nic_efficiency
    if flat:
        return _stage(n - 1, (n - 1) / n * elements * nbytes / g, c.net_hop_latency_s, nic)
    m = n // g
    inside = _stage(g - 1, (g - 1) / g * elements * nbytes, c.nvlink_hop_latency_s,
                    c.nvlink_gbyte_s * 1e9 * c.nvlink_efficiency)
    return inside + _stage(m - 1, (m - 1) / m * elements * nbytes / g, c.net_hop_latency_s, nic)


def collective_seconds(kind: str, elements: float, nbytes: float, n: int, c: Cluster, *, calls: int,
                       flat: bool, fp8: bool) -> float:
    """Wire seconds of ``calls`` equal calls of ``kind`` (all_reduce | reduce_scatter | all_gather)
    moving ``elements`` per GPU in all."""
    halves = 2 if kind == "all_reduce" else 1
    per_call = halves * _half_collective(elements / calls, nbytes, n, c, flat)
    amax_sync = 2 * math.ceil(math.log2(n)) * c.net_hop_latency_s if fp8 and kind != "all_gather" else 0.0
    return calls * (per_call + amax_sync)


def codec_seconds_per_element(kind: str, n: int, c: Cluster, *, flat: bool) -> float:
    """GPU seconds of the FP8 codec per element of S (module docstring)."""
    g = min(c.gpus_per_node, n)
    rs = 6 + 4 / n + (0 if flat or n <= g else 6 / g)
    hbm_bytes = {"reduce_scatter": rs, "all_reduce": rs + 3, "all_gather": 0.0}[kind]
    return hbm_bytes / (c.hbm_gbyte_s * 1e9 * c.hbm_efficiency)


@dataclass(frozen=True, kw_only=True, slots=True)
class Projection:
    model: str
    gpus: int
    strategy: str
    precision: str
    state_gbytes: float   # model state per GPU, bf16 weights + grads, fp32 AdamW (16 B/param in all)
    compute_s: float
    wire_s: float         # every collective of the step, end to end
    exposed_s: float      # the part compute does not hide
    codec_s: float        # FP8 quantize / decode on the GPU, not hidden
    step_s: float

    @property
    def share(self) -> float:
        return (self.exposed_s + self.codec_s) / self.step_s


# (kind, phase, weights?) per strategy: phase "fwd"/"bwd" overlaps that phase's compute, "after" is exposed
_PLANS = {
    "ddp": [("all_reduce", "bwd", False)],
    "zero2": [("reduce_scatter", "bwd", False), ("all_gather", "after", True)],
    "fsdp2": [("all_gather", "fwd", True), ("all_gather", "bwd", True), ("reduce_scatter", "bwd", False)],
}


def _state_gbytes(strategy: str, params: float, n: int) -> float:
    per_param = {"ddp": 16.0, "zero2": 2 + 14 / n, "fsdp2": 16 / n}[strategy]  # ZeRO-2 keeps bf16 weights whole
    return per_param * params / 1e9


def project(model: LlamaShape, n: int, strategy: str, precision: str, c: Cluster, *, flat: bool = False) -> Projection:
    """One optimizer step of ``strategy`` on ``n`` GPUs with bf16 or fp8 collectives."""
    fp8 = precision == "fp8"
    compute = c.tokens_per_gpu * model.flops_per_token() / (c.peak_tflops * 1e12 * c.mfu)
    phase_compute = {"fwd": compute / 3, "bwd": 2 * compute / 3, "after": 0.0}
    bucket_calls = max(1, round(model.params * 2 / c.ddp_bucket_bytes if strategy == "ddp"
                                else model.params / c.zero_bucket_elements))
    wire = {"fwd": 0.0, "bwd": 0.0, "after": 0.0}
    last_call = {"fwd": 0.0, "bwd": 0.0, "after": 0.0}
    codec = 0.0
    for kind, phase, weights in _PLANS[strategy]:
        calls = model.layers if strategy == "fsdp2" else bucket_calls
        # FP8 weights: the blocks' linears travel as E4M3 codes, embedding and head in bf16
        nbytes = (1 + (1 - model.linear_fraction) if weights else 1.0) if fp8 else 2.0
        seconds = collective_seconds(kind, model.params, nbytes, n, c, calls=calls, flat=flat, fp8=fp8)
        wire[phase] += seconds
        last_call[phase] += seconds / calls
        if fp8:
            codec += model.params * codec_seconds_per_element(kind, n, c, flat=flat)
    # in each phase at least one call (the first gather, the last bucket) waits on the wire
    exposed = sum(max(wire[p] - c.overlap * phase_compute[p], last_call[p]) for p in wire if wire[p])
    return Projection(model=model.name, gpus=n, strategy=strategy, precision=precision,
                      state_gbytes=_state_gbytes(strategy, model.params, n), compute_s=compute,
                      wire_s=sum(wire.values()), exposed_s=exposed, codec_s=codec, step_s=compute + exposed + codec)


def assumption_rows(c: Cluster) -> list[tuple[str, str]]:
    """(field, value) for every assumption, printed with the projection."""
    return [(f.name, str(getattr(c, f.name))) for f in fields(c)]
