"""Finer scales: one power-of-two scale per row or block of a GEMM operand (``Fp8Config.granularity``).

Rule: each block gets the per-tensor rule of fp8train/scaling.py applied to its own amax,
``log2_scale = floor(log2(fmax / amax_block)) - margin`` (``amax_to_log2_scale``), so no block
saturates and scaling/unscaling stays exact (a power of two changes only exponents).

Layout: each operand is scaled along the reduction dim of the GEMM it feeds, so that a scale is
constant over the run of products it multiplies (x (M, K), w (N, K), dy (M, N)):
    forward  y  = x w^T   reduces K:  x along K,  w along K
    dgrad    dx = dy w    reduces N:  dy along N, w along N
    wgrad    dw = dy^T x  reduces M:  dy along M, x along M
An operand used by two GEMMs with different reduction dims is therefore cast twice, once per layout
(as Transformer Engine does): x and dy always; w for "rowwise" and "mx"; "block" gives weights 128x128
blocks, which serve both of its GEMMs from one cast (DeepSeek-V3's reason for them).
    granularity  along a dim (activations, gradients)    weights
    rowwise      the whole dim (one scale per row/col)    the same
    block        tiles of 128                             128 x 128
    mx           blocks of 32, scales stored as E8M0      the same (blocks of 32)

Edge cases (numerical decisions):
  - Ragged sizes (a dim not a multiple of 32 / 128): the last block is partial, its amax taken over
    the elements it has (zero padding, which never wins a max and is cropped after the cast).
  - An all-zero block takes the tensor's bias (the one its largest block gets), so that it neither
    needs a special case in the GEMMs nor skews the min/median/max biases monitoring reports; an
    all-zero tensor keeps the previous bias, as per tensor.
  - inf/NaN anywhere makes the tensor's amax non-finite: every ``scale_inv`` of the cast is NaN (so
    every GEMM output using it is NaN, the per-tensor policy of fp8train/scaling_state.py) while the
    returned biases stay finite (the previous bias).
  - MX: the scale_inv is stored as E8M0 (``torch.float8_e8m0fnu``, 2**(e - 127), NaN = 0xFF); the
    biases clamped to [-126, 126] always fit. Our rule rounds the scale down where OCP's
    (floor(log2 amax) - emax) can map a block's amax up to 512 > 448 and saturate it; never
    saturating is what the RCEIL variant that trains stably does (arXiv 2506.08027).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fp8train.cast import Fp8CastStats, cast_to_fp8_reference, quantization_stats
from fp8train.formats import Fp8Format, as_fp8_format
from fp8train.scaling import amax_to_log2_scale
from fp8train.tensor import Fp8Tensor, expand_block_scales

__all__ = ["BLOCK_TILES", "BlockCast", "block_cast_stats", "blocks_view", "operand_block", "quantize_blocks",
           "resolve_block"]

# elements per block along the scaled dim; 0 = the whole dim (one scale per row or column)
BLOCK_TILES = {"rowwise": 0, "block": 128, "mx": 32}
_WEIGHT_BLOCK = (128, 128)  # "block" weights: 2-D blocks, the same cast for forward and dgrad
_ROLES = ("input", "weight", "grad_output")


def operand_block(granularity: str, role: str, dim: int) -> tuple[int, int]:
    """(rows, cols) that one scale covers in a 2-D operand of ``role`` fed to a GEMM that reduces
    its ``dim`` (0 or 1); a 0 stands for the whole dim (see the module docstring's table)."""
    if granularity not in BLOCK_TILES or role not in _ROLES or dim not in (0, 1):
        raise ValueError(f"operand_block(granularity={granularity!r}, role={role!r}, dim={dim!r}): allowed "
                         f"granularities {tuple(BLOCK_TILES)}, roles {_ROLES}, dims 0, 1")
    if granularity == "block" and role == "weight":
        return _WEIGHT_BLOCK
    tile = BLOCK_TILES[granularity]
    return (1, tile) if dim == 1 else (tile, 1)


def resolve_block(block: tuple[int, int], shape: torch.Size | tuple[int, int]) -> tuple[int, int]:
    """``block`` with each 0 replaced by that dim's size (at least 1)."""
    return (block[0] or max(shape[0], 1), block[1] or max(shape[1], 1))


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockCast:
    """One per-block cast.

    tensor:           the ``Fp8Tensor`` (``block`` set, ``scale_inv`` per block; NaN on overflow).
    amax:             0-d fp32, max |x| over the tensor (inf/NaN where x has them).
    log2_scale:       0-d fp32, the tensor's bias: that of its largest block (= the min block bias),
                      the previous bias where amax is 0 or non-finite. What a ScalingState stores.
    block_log2_scale: (ceil(R/rows), ceil(C/cols)) fp32, each block's bias (finite).
    """

    tensor: Fp8Tensor
    amax: torch.Tensor
    log2_scale: torch.Tensor
    block_log2_scale: torch.Tensor


def blocks_view(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x (R, C) zero-padded to whole blocks and viewed as (R/rows, rows, C/cols, cols)."""
    rows, cols = block
    pad_r, pad_c = (-x.shape[0]) % rows, (-x.shape[1]) % cols
    if pad_r or pad_c:
        x = F.pad(x, (0, pad_c, 0, pad_r))
    return x.reshape(x.shape[0] // rows, rows, x.shape[1] // cols, cols)


@torch.no_grad()
def quantize_blocks(x_hp: torch.Tensor, fmt: Fp8Format | torch.dtype | str, block: tuple[int, int], *,
                    margin: int, e8m0: bool, prev_log2_scale: torch.Tensor | None = None) -> BlockCast:
    """Cast a 2-D ``x_hp`` with one power-of-two scale per ``block`` (rows, cols; 0 = whole dim),
    the cast semantics of ``cast_to_fp8_reference`` per block (clamp, round to nearest even).
    ``e8m0``: store ``scale_inv`` as ``torch.float8_e8m0fnu`` (MX). ``prev_log2_scale``: the bias an
    all-zero or non-finite tensor keeps (0 when None)."""
    fmt = as_fp8_format(fmt)
    if x_hp.dim() != 2:
        raise ValueError(f"quantize_blocks needs a 2-D tensor, got shape {tuple(x_hp.shape)}")
    block = resolve_block(block, x_hp.shape)
    x_blocks = blocks_view(x_hp.to(torch.float32), block)                      # (nbr, br, nbc, bc)
    amax_blocks = x_blocks.abs().amax(dim=(1, 3))                                # (nbr, nbc), NaN-propagating
    amax = amax_blocks.max() if amax_blocks.numel() else torch.zeros((), device=x_hp.device)
    prev = torch.zeros((), device=x_hp.device) if prev_log2_scale is None else prev_log2_scale
    log2_scale = amax_to_log2_scale(amax, fmt, margin=margin, prev_log2_scale=prev.to(torch.float32))
    block_log2 = amax_to_log2_scale(amax_blocks, fmt, margin=margin,
                                    prev_log2_scale=log2_scale.expand_as(amax_blocks))
    codes = cast_to_fp8_reference(x_blocks, torch.exp2(block_log2)[:, None, :, None], fmt)
    codes = codes.reshape(x_blocks.shape[0] * block[0], -1)[: x_hp.shape[0], : x_hp.shape[1]].contiguous()
    scale_inv = torch.exp2(-block_log2)
    scale_inv = torch.where(torch.isfinite(amax), scale_inv, torch.full_like(scale_inv, math.nan))
    if e8m0:  # powers of two in 2**[-126, 126] and NaN: exact in E8M0
        scale_inv = scale_inv.to(torch.float8_e8m0fnu)
    tensor = Fp8Tensor(data=codes, scale_inv=scale_inv, orig_dtype=x_hp.dtype, block=block)
    return BlockCast(tensor=tensor, amax=amax, log2_scale=log2_scale, block_log2_scale=block_log2)


def block_cast_stats(x_hp: torch.Tensor, cast: BlockCast) -> Fp8CastStats:
    """``quantization_stats`` of a per-block cast: each element counted against its block's scale."""
    t = cast.tensor
    scale = expand_block_scales(torch.exp2(cast.block_log2_scale), t.block, t.shape)
    return quantization_stats(x_hp, scale, t.data, t.fmt)
