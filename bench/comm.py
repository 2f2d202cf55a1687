"""Gradient synchronisation benchmark: FP8 all-reduce and FP8 reduce-scatter (fp8train.comm) vs the
stock collectives in fp32 and bf16.

    torchrun --nproc-per-node=2 bench/comm.py               # loopback, 2 processes (~1-2 min)
    torchrun --nproc-per-node=4 bench/comm.py --sizes 16M   # loopback, 4 processes
    # two "nodes" joined by a 1 Gbit/s link (network namespaces on this machine; needs root):
    launch/netns_cluster.sh up 2 1gbit
    launch/netns_cluster.sh exec 1 sh -c 'exec .venv/bin/torchrun --nnodes=2 --nproc-per-node=1 \
        --node-rank=1 --master-addr=$MASTER_ADDR --master-port=29511 bench/comm.py --label 1gbit' &
    launch/netns_cluster.sh exec 0 sh -c 'exec .venv/bin/torchrun --nnodes=2 --nproc-per-node=1 \
        --node-rank=0 --master-addr=$MASTER_ADDR --master-port=29511 bench/comm.py --label 1gbit'
    launch/netns_cluster.sh down
    bash bench/comm_netns.sh     # the runs bench/comm_model.py fits (2 and 4 nodes, 1 and 5 Gbit/s)

Each rank holds a gradient list of 8 fp32 tensors (the given total number of elements). Methods:
  all_reduce (what DDP does with the gradients):
    fp32   dist.all_reduce(SUM) of the fp32 tensors, then / N (DDP's default);
    bf16   cast to bf16, all_reduce, cast back (DDP's bf16 compression hook);
    fp8    fp8train.comm.fp8_all_reduce_ (amax sync, FP8 reduce-scatter, FP8 all-gather).
  reduce_scatter (what FSDP2 does with them; each rank keeps the mean of its 1/N of the flat gradient):
    fp32   the tensors copied into one flat fp32 buffer (padded to a multiple of N, as FSDP2 pads),
           dist.reduce_scatter_single (the current name of reduce_scatter_tensor; FSDP2's own call),
           then / N: FSDP2 with reduce_dtype fp32;
    bf16   the same with a bf16 buffer, the shard cast back to fp32: FSDP2's bf16 MixedPrecisionPolicy;
    fp8    fp8train.comm.fp8_reduce_scatter (amax MAX-sync, FP8 all-to-all, fp32 decode-sum), the
           function the fsdp2 strategy hands to FSDP2's set_custom_reduce_scatter;
    fp32-a2a  the fp32 chunks moved as fp8 moves its own (pairwise exchange), then summed: gloo's
           reduce_scatter_single sends an all-reduce's bytes (2(N-1)/N, see "wire MB"; measured: 67.2 MB
           per rank for 16M fp32 elements on 2 nodes, where a ring sends 33.6 MB), so this row is the
           wire-fair fp32 baseline (NCCL's reduce-scatter is a ring); a line under the table gives fp8
           against it.
Wall time: median of --repeat calls after 2 warm-ups, all ranks starting together (barrier); the
methods take turns round by round. Bytes: sent per rank as a ring moves them (all-reduce 2(N-1)/N,
reduce-scatter (N-1)/N per element times the element size; fp8: counted by fp8train.comm). With one
process per node on a named interface (GLOO_SOCKET_IFNAME, as in the netns recipe) the table also
shows the bytes that interface really sent per call (/proc/net/dev: TCP/IP headers included).
Targets (issue 17, on the 1 Gbit/s two-node link; loopback is CPU-bound and shown for reference):
FP8 reduce-scatter <= 0.35x the fp32 time and <= 0.26x the fp32 bytes. Rank 0 prints the table,
then (unless --no-split) what each FP8 all-reduce phase costs run alone (barrier before each,
unpipelined: the p2p path overlaps quantize / decode-sum / decode with the wire, so its total is
below the sum). --json appends one record per row to a JSON-lines file (bench/comm_model.py fits them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from fp8train.cast import cast_to_fp8
from fp8train.comm import Fp8CommConfig, fp8_all_reduce_, fp8_reduce_scatter
from fp8train.comm._codec import BucketCodec
from fp8train.comm._collectives import Collectives
from fp8train.comm._layout import FlatLayout, uniform_bounds
from fp8train.comm.allreduce import _quantize_flat, _reduce_chunk, _sync_log2_scales
from fp8train.comm.stats import CommStats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import verdict  # noqa: E402  (bench/ is a folder of scripts, not a package)

N_TENSORS = 8
COLLECTIVES = ("all_reduce", "reduce_scatter")
# issue 17's targets for the FP8 reduce-scatter on the 1 Gbit/s two-node link, as fractions of fp32
TARGETS = {("reduce_scatter", "fp8"): {"time": 0.35, "bytes": 0.26}}


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
    log2_scale, _, _ = _sync_log2_scales(grads, fmt, config.margin, coll)
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


def _rs_single() -> Callable[..., object]:
    # reduce_scatter_single is the current name (torch >= 2.12, what FSDP2 calls); reduce_scatter_tensor before
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _reduce_scatter(grads: list[torch.Tensor], flat: torch.Tensor, shard: torch.Tensor, world: int) -> torch.Tensor:
    """FSDP2's gradient reduce-scatter in ``flat``'s dtype: copy-in (cast), reduce-scatter, the fp32 mean."""
    elements = sum(g.numel() for g in grads)
    torch.cat(grads, out=flat[:elements])  # casts to flat's dtype, as FSDP2's copy-in does; padding stays 0
    _rs_single()(shard, flat)
    return shard.to(torch.float32).div_(world)


def _a2a_reduce_scatter(grads: list[torch.Tensor], flat: torch.Tensor, recv: torch.Tensor, world: int) -> torch.Tensor:
    """The fp32 reduce-scatter as fp8_reduce_scatter moves its bytes (pairwise exchange of the chunks,
    (N-1)/N of the buffer out, as a ring or NCCL sends it), then the fp32 sum: the wire-fair baseline,
    since gloo's reduce_scatter_single puts an all-reduce's bytes on the wire (the "wire MB" column)."""
    elements = sum(g.numel() for g in grads)
    torch.cat(grads, out=flat[:elements])
    chunk_bytes = flat.nbytes // world
    Collectives(None, CommStats(), "p2p").all_to_all_(recv.view(torch.uint8), flat.view(torch.uint8),
                                                      [chunk_bytes] * world, [chunk_bytes] * world)
    return recv.view(world, -1).sum(0).div_(world)


def _methods(collective: str, grads: list[torch.Tensor], world: int,
             config: Fp8CommConfig) -> dict[str, Callable[[], object]]:
    if collective == "all_reduce":
        return {"fp32": lambda: _fp32_all_reduce(grads, world), "bf16": lambda: _bf16_all_reduce(grads, world),
                "fp8": lambda: fp8_all_reduce_(grads, config=config)}
    elements = sum(g.numel() for g in grads)
    padded = -(-elements // world) * world
    bounds = uniform_bounds(elements, world)
    buffers = {dtype: (torch.zeros(padded, dtype=dtype), torch.empty(padded // world, dtype=dtype))
               for dtype in (torch.float32, torch.bfloat16)}
    a2a = (torch.zeros(padded), torch.empty(padded))
    return {"fp32": lambda: _reduce_scatter(grads, *buffers[torch.float32], world),
            "bf16": lambda: _reduce_scatter(grads, *buffers[torch.bfloat16], world),
            "fp8": lambda: fp8_reduce_scatter(grads, bounds, config=config),
            "fp32-a2a": lambda: _a2a_reduce_scatter(grads, *a2a, world)}


def _bytes_sent(collective: str, grads: list[torch.Tensor], world: int, config: Fp8CommConfig) -> dict[str, int]:
    """Bytes each rank sends per call: a ring's count for the stock collectives, fp8train.comm's own for FP8."""
    elements = sum(g.numel() for g in grads)
    if collective == "all_reduce":
        ring = 2 * (world - 1) / world
        fp8 = fp8_all_reduce_(grads, config=config).bytes_sent
    else:
        ring, elements = (world - 1) / world, -(-elements // world) * world  # FSDP2's padded buffer
        fp8 = fp8_reduce_scatter(grads, uniform_bounds(sum(g.numel() for g in grads), world),
                                 config=config)[1].bytes_sent
    return {"fp32": round(ring * 4 * elements), "bf16": round(ring * 2 * elements), "fp8": fp8,
            "fp32-a2a": round(ring * 4 * elements)}


def _tx_bytes() -> int | None:
    """Bytes this network namespace's GLOO_SOCKET_IFNAME has sent (/proc/net/dev), when this process is
    the only one of its node (else the count would mix ranks); None otherwise."""
    iface = os.environ.get("GLOO_SOCKET_IFNAME")
    if iface is None or os.environ.get("LOCAL_WORLD_SIZE", "1") != "1":
        return None
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == iface:
                return int(counters.split()[8])  # receive: 8 fields, then transmit bytes
    return None


def _measure(methods: dict[str, Callable[[], object]],
             repeat: int) -> tuple[dict[str, float], dict[str, float], dict[str, float | None]]:
    """Median and fastest seconds per method (2 warm-up rounds, methods taking turns) and median bytes the
    interface sent per call (None where it cannot be read)."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    wire: dict[str, list[int]] = {name: [] for name in methods}
    for round_ in range(repeat + 2):
        for name, fn in methods.items():
            before = _tx_bytes()
            seconds = _timed(fn)
            dist.barrier()  # every rank has received everything, so all this rank sent has left its interface
            after = _tx_bytes()
            if round_ >= 2:
                times[name].append(seconds)
                if before is not None and after is not None:
                    wire[name].append(after - before)
    return ({name: statistics.median(ts) for name, ts in times.items()}, {name: min(ts) for name, ts in times.items()},
            {name: statistics.median(ws) if ws else None for name, ws in wire.items()})


def _row_record(collective: str, elements: int, method: str, seconds: dict[str, float], fastest: dict[str, float],
                sent: dict[str, int], wire: dict[str, float | None]) -> dict:
    targets = TARGETS.get((collective, method), {})
    time_ratio, bytes_ratio = seconds[method] / seconds["fp32"], sent[method] / sent["fp32"]
    return {"collective": collective, "elements": elements, "method": method, "seconds": seconds[method],
            "seconds_min": fastest[method],
            "bytes_sent": sent[method], "wire_bytes": wire[method], "time_vs_fp32": time_ratio,
            "bytes_vs_fp32": bytes_ratio,
            "time_verdict": verdict(time_ratio, targets.get("time"), at_most=True),
            "bytes_verdict": verdict(bytes_ratio, targets.get("bytes"), at_most=True)}


def _print_table(records: list[dict], header: str) -> None:
    print(f"\n{header}")
    wire = any(r["wire_bytes"] is not None for r in records)
    print(f"{'collective':<14} | {'elements':>8} | {'method':<8} | {'ms':>8} | {'sent MB/rank':>12} | "
          + (f"{'wire MB':>8} | " if wire else "")
          + f"{'time vs fp32':>12} | {'bytes vs fp32':>13} | {'time verdict':<15} | bytes verdict")
    for r in records:
        wire_mb = "-" if r["wire_bytes"] is None else f"{r['wire_bytes'] / 1e6:.1f}"
        measured = f"{wire_mb:>8} | " if wire else ""
        print(f"{r['collective']:<14} | {r['elements'] / 2**20:>7.0f}M | {r['method']:<8} | "
              f"{r['seconds'] * 1e3:8.1f} | {r['bytes_sent'] / 1e6:12.1f} | {measured}{r['time_vs_fp32']:11.2f}x | {r['bytes_vs_fp32']:12.3f}x | "
              f"{r['time_verdict']:<15} | {r['bytes_verdict']}")
    fair = {r["elements"]: r for r in records if r["method"] == "fp32-a2a"}
    for r in records:
        if r["collective"] == "reduce_scatter" and r["method"] == "fp8" and r["elements"] in fair:
            base = fair[r["elements"]]
            print(f"reduce_scatter {r['elements'] / 2**20:.0f}M: fp8 vs fp32-a2a (the same exchange in fp32): "
                  f"time {r['seconds'] / base['seconds']:.2f}x, bytes {r['bytes_sent'] / base['bytes_sent']:.3f}x")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16M,64M", help="comma-separated gradient elements per rank (K/M/G)")
    parser.add_argument("--collectives", default=",".join(COLLECTIVES), help=f"comma-separated, of {COLLECTIVES}")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per method (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--label", default="loopback", help="name of the setting, printed in the table")
    parser.add_argument("--link-gbit", type=float, default=None,
                        help="the link rate in Gbit/s, recorded in --json (none: loopback)")
    parser.add_argument("--exchange", default="auto", choices=("auto", "collective", "p2p"),
                        help="Fp8CommConfig.exchange: how the FP8 chunks move")
    parser.add_argument("--no-split", action="store_true", help="skip the FP8 all-reduce phase split")
    parser.add_argument("--json", default=None, help="append one JSON record per row to this file (rank 0)")
    args = parser.parse_args()
    bad = [c for c in args.collectives.split(",") if c not in COLLECTIVES]
    if bad:
        parser.error(f"--collectives: got {bad}; allowed: {', '.join(COLLECTIVES)}")
    return args


def main() -> None:
    args = _parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = Fp8CommConfig(bucket_bytes=2**40, exchange=args.exchange)  # one bucket: the whole list (its amax in one sync)
    records, splits = [], []
    for numel in (_parse_size(s) for s in args.sizes.split(",")):
        gen = torch.Generator().manual_seed(rank)
        grads = [torch.randn(numel // N_TENSORS, generator=gen) * 1e-3 for _ in range(N_TENSORS)]
        elements = sum(g.numel() for g in grads)
        for collective in args.collectives.split(","):
            seconds, fastest, wire = _measure(_methods(collective, grads, world, config), args.repeat)
            sent = _bytes_sent(collective, grads, world, config)
            records += [_row_record(collective, elements, m, seconds, fastest, sent, wire) for m in seconds]
        if not args.no_split:
            phases = [_fp8_phases(grads, config) for _ in range(3)]
            splits.append((elements, {k: statistics.median(p[k] for p in phases) for k in phases[0]}))
    if rank == 0:
        host = os.uname().nodename
        _print_table(records, f"{args.label}: exchange={args.exchange}, {world} processes (host {host}), "
                              f"{args.threads} thread(s) each, median of {args.repeat}")
        if splits:
            print("\nfp8 all-reduce split (s, median of 3, barrier before each phase):")
        for elements, split in splits:
            print(f"{elements / 2**20:>8.0f}M | " + " | ".join(f"{k} {v:.3f}" for k, v in split.items()))
        if args.json:
            setting = {"label": args.label, "nodes": int(os.environ.get("GROUP_WORLD_SIZE", world)), "world": world,
                       "link_gbit": args.link_gbit, "exchange": args.exchange, "repeat": args.repeat,
                       "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "argv": " ".join(sys.argv)}
            with open(args.json, "a") as f:
                for r in records:
                    f.write(json.dumps({**setting, **r}) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
