"""``Fp8CommConfig``: how gradients travel in FP8 (format, margin, bucket size, sampled statistics).
Frozen once built (``dataclasses.replace`` makes a changed, re-validated copy)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8train._validate import check_choice, check_int_range
from fp8train.formats import FP8_DTYPES, FP8_FORMATS, Fp8Format

__all__ = ["Fp8CommConfig"]

_OWNER = "Fp8CommConfig"


@dataclass(frozen=True, kw_only=True, slots=True)
class Fp8CommConfig:
    """format:       FP8 format on the wire: "e4m3" (default: 3 mantissa bits, relative error <= 2**-4;
                     the shared scale already fits the global amax, so e5m2's extra range buys
                     nothing for a mean) or "e5m2" (2 mantissa bits, relative error <= 2**-3);
                     torch.float8_e4m3fn / torch.float8_e5m2 are accepted too and stored as the name.
    margin:          extra power-of-two headroom under the format's max (scaling bias reduced by it);
                     0 is safe here because the scale comes from the global amax of this very data.
    bucket_bytes:    gradient bytes (in their own dtype) per bucket for ``fp8_all_reduce_``: one amax
                     sync, one all-to-all and one all-gather per bucket. DDP hooks use DDP's buckets.
    stats_every:     count saturated / underflowed elements every k-th call (an extra pass over the
                     gradients); 0 never.
    exchange:        how the FP8 chunks move: "collective" (all_to_all_single + all_gather_single),
                     "p2p" (batched isend/irecv to every peer, the same bytes), or "auto" (default:
                     p2p on gloo, collective elsewhere). Measured on a 1 Gbit/s link between two
                     hosts: gloo's all_to_all_single moves 59 MB/s and its all-gather 74 MB/s, an
                     isend/irecv pair 119 MB/s (line rate); NCCL implements both as grouped p2p.
    p2p_piece_bytes: p2p messages go in pieces of this many bytes, all in flight at once, so that
                     compute on one piece overlaps the wire of the next (see comm/_pipeline.py).
    """

    format: str = "e4m3"
    margin: int = 0
    bucket_bytes: int = 64 * 2**20
    stats_every: int = 0
    exchange: str = "auto"
    p2p_piece_bytes: int = 4 * 2**20

    def __post_init__(self) -> None:
        if isinstance(self.format, torch.dtype) and self.format in FP8_DTYPES:
            # YAML and wandb see the name; frozen, so the one normalisation goes through object.__setattr__
            object.__setattr__(self, "format", FP8_DTYPES[self.format].name)
        check_choice(_OWNER, "format", self.format, tuple(FP8_FORMATS))
        check_int_range(_OWNER, "margin", self.margin, 0, 16)
        check_int_range(_OWNER, "bucket_bytes", self.bucket_bytes, 1)
        check_int_range(_OWNER, "stats_every", self.stats_every, 0)
        check_choice(_OWNER, "exchange", self.exchange, ("auto", "collective", "p2p"))
        check_int_range(_OWNER, "p2p_piece_bytes", self.p2p_piece_bytes, 1)

    @property
    def fp8_format(self) -> Fp8Format:
        return FP8_FORMATS[self.format]
