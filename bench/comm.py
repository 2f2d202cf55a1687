"""Gradient synchronisation benchmark: FP8 all-reduce (fp8train.comm) vs all_reduce in fp32 and bf16.

    torchrun --nproc-per-node=2 bench/comm.py               # loopback, 2 processes (~1-2 min)
    torchrun --nproc-per-node=4 bench/comm.py --sizes 16M   # loopback, 4 processes
    # two "nodes" joined by a 1 Gbit/s link (network namespaces on this machine; needs root):
    launch/netns_cluster.sh up 2 1gbit
    launch/netns_cluster.sh exec 1 sh -c 'exec .venv/bin/torchrun --nnodes=2 --nproc-per-node=1 \
        --node-rank=1 --master-addr=$MASTER_ADDR --master-port=29511 bench/comm.py --label 1gbit' &
    launch/netns_cluster.sh exec 0 sh -c 'exec .venv/bin/torchrun --nnodes=2 --nproc-per-node=1 \
        --node-rank=0 --master-addr=$MASTER_ADDR --master-port=29511 bench/comm.py --label 1gbit'
    launch/netns_cluster.sh down

Each rank holds a gradient list of 8 fp32 tensors (the given total number of elements). Methods:
  fp32   dist.all_reduce(SUM) of the fp32 tensors, then / N (what DDP does by default);
  bf16   cast to bf16, all_reduce, cast back (DDP's bf16 compression hook);
  fp8    fp8train.comm.fp8_all_reduce_ (amax sync, FP8 reduce-scatter, FP8 all-gather).
Wall time: median of --repeat calls after 2 warm-ups, all ranks starting together (barrier); the
methods take turns round by round. Wire bytes: sent per rank as a ring moves them (fp32/bf16:
2(N-1)/N per element times the element size; fp8: counted by fp8train.comm). Rank 0 prints the
table, then what each FP8 phase costs run alone (barrier before each, unpipelined: the p2p path
overlaps quantize / decode-sum / decode with the wire, so its total is below the sum).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from fp8train.cast import cast_to_fp8
from fp8train.comm import Fp8CommConfig, fp8_all_reduce_
from fp8train.comm._codec import BucketCodec
from fp8train.comm._collectives import Collectives
from fp8train.comm._layout import FlatLayout, uniform_bounds
from fp8train.comm.allreduce import _quantize_flat, _reduce_chunk, _sync_log2_scales
from fp8train.comm.stats import CommStats

N_TENSORS = 8


def _parse_size(text: str) -> int:
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * mult[text[-1].upper()] if text[-1].upper() in mult else int(text)


def _timed(fn: Callable[[], object]) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _fp32_all_reduce(grads: list[torch.Tensor], world: int) -> None:
    for g in grads:
        dist.all_reduce(g)
        g.div_(world)


def _bf16_all_reduce(grads: list[torch.Tensor], world: int) -> None:
    for g in grads:
        g_bf16 = g.to(torch.bfloat16)
        dist.all_reduce(g_bf16)
        g.copy_(g_bf16).div_(world)


def _fp8_phases(grads: list[torch.Tensor], config: Fp8CommConfig) -> dict[str, float]:
    """The steps of fp8_all_reduce_ for one bucket holding all of ``grads``, each timed after a barrier."""
    fmt, layout = config.fp8_format, FlatLayout.of(grads)
    coll = Collectives(None, CommStats(), config.exchange, config.p2p_piece_bytes)
    t: dict[str, float] = {}
    start = time.perf_counter()
    log2_scale, _ = _sync_log2_scales(grads, fmt, config.margin, coll)
    t["amax + sync"] = time.perf_counter() - start
    flat = None
    codec = BucketCodec(grads, layout, log2_scale, fmt)

    def quantize() -> None:
        nonlocal flat
        flat = _quantize_flat(codec, CommStats(), False)

    t["quantize"] = _timed(quantize)
    bounds = uniform_bounds(layout.numel, coll.world_size)
    mean = None

    def reduce_scatter() -> None:
        nonlocal mean
        mean = _reduce_chunk(flat, bounds, fmt, coll)

    t["all-to-all + decode-sum"] = _timed(reduce_scatter)
    chunk = bounds[1]
    mine = torch.zeros(chunk, dtype=torch.uint8)
    t["requantize mean"] = _timed(lambda: cast_to_fp8(mean, torch.ones(()), fmt, out=mine[:mean.numel()].view(fmt.dtype)))
    gathered = torch.empty(coll.world_size * chunk, dtype=torch.uint8)
    t["all-gather"] = _timed(lambda: coll.all_gather_(gathered, mine))

    def decode() -> None:
        codec.decode(0, gathered[:layout.numel])

    t["decode into grads"] = _timed(decode)
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16M,64M", help="comma-separated gradient elements per rank (K/M/G)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per method (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--label", default="loopback", help="name of the setting, printed in the table")
    parser.add_argument("--exchange", default="auto", choices=("auto", "collective", "p2p"),
                        help="Fp8CommConfig.exchange: how the FP8 chunks move")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = Fp8CommConfig(bucket_bytes=2**40, exchange=args.exchange)  # one bucket: the whole list (its amax in one sync)
    rows = []
    for numel in (_parse_size(s) for s in args.sizes.split(",")):
        gen = torch.Generator().manual_seed(rank)
        grads = [torch.randn(numel // N_TENSORS, generator=gen) * 1e-3 for _ in range(N_TENSORS)]
        elements = sum(g.numel() for g in grads)
        methods = {"fp32": lambda: _fp32_all_reduce(grads, world), "bf16": lambda: _bf16_all_reduce(grads, world),
                   "fp8": lambda: fp8_all_reduce_(grads, config=config)}
        times: dict[str, list[float]] = {name: [] for name in methods}
        for round_ in range(args.repeat + 2):
            for name, fn in methods.items():
                seconds = _timed(fn)
                if round_ >= 2:
                    times[name].append(seconds)
        ring = 2 * (world - 1) / world
        sent = {"fp32": ring * 4 * elements, "bf16": ring * 2 * elements,
                "fp8": fp8_all_reduce_(grads, config=config).bytes_sent}
        phases = [_fp8_phases(grads, config) for _ in range(3)]
        median = {name: statistics.median(ts) for name, ts in times.items()}
        rows.append((elements, median, sent, {k: statistics.median(p[k] for p in phases) for k in phases[0]}))
    if rank == 0:
        host = os.uname().nodename
        print(f"\n{args.label}: exchange={args.exchange}, {world} processes (host {host}), {args.threads} thread(s) each, median of {args.repeat}")
        print(f"{'elements':>9} | {'method':<6} | {'time s':>7} | {'sent MB/rank':>12} | {'time vs fp32':>12} | {'bytes vs fp32':>13}")
        for elements, median, sent, _ in rows:
            for name in ("fp32", "bf16", "fp8"):
                print(f"{elements / 2**20:>8.0f}M | {name:<6} | {median[name]:7.3f} | {sent[name] / 1e6:12.1f} | "
                      f"{median[name] / median['fp32']:11.2f}x | {sent[name] / sent['fp32']:12.3f}x")
        print("\nfp8 split (s, median of 3, barrier before each phase):")
        for elements, _, _, split in rows:
            print(f"{elements / 2**20:>8.0f}M | " + " | ".join(f"{k} {v:.3f}" for k, v in split.items()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
