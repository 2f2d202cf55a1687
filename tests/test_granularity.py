"""Finer scales (Fp8Config.granularity): the config, per-block casts bit-exact against ml_dtypes,
the operand layouts, and the GEMMs bit-exact against a float64 reference (docs/design.md, Numerical
decisions, "finer scales")."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from fp8train import E4M3, E5M2, Fp8Config, fp8_mm
from fp8train.blocks import operand_block, quantize_blocks
from fp8train.gemm import select_gemm

# ---- config ------------------------------------------------------------------------------------


def test_granularity_defaults_to_tensor():
    assert Fp8Config().granularity == "tensor"


@pytest.mark.parametrize(("kwargs", "message"), [
    ("bad_value", "Fp8Config.granularity='row' is not allowed; allowed values: 'tensor', 'rowwise', 'block', 'mx'"),
    ("delayed", "Fp8Config.granularity='mx' needs recipe='current'"),
    ("constant", "Fp8Config.granularity='block' needs recipe='current'"),
    ("scaled_mm_mx", "Fp8Config.backend='scaled_mm' runs granularity 'tensor' or 'rowwise' only"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_config_errors_are_one_line(kwargs: str, message: str):
    cases = {"bad_value": dict(granularity="row"), "delayed": dict(granularity="mx", recipe="delayed"),
             "constant": dict(granularity="block", recipe="constant"),
             "scaled_mm_mx": dict(granularity="mx", backend="scaled_mm")}
    with pytest.raises(ValueError) as err:
        Fp8Config(**cases[kwargs])
    assert message in str(err.value) and "\n" not in str(err.value)


# ---- operand layouts: each operand scaled along the reduction dim of the GEMM it feeds -----------
# x (M, K), w (N, K), dy (M, N); forward y = x w^T reduces K, dgrad dx = dy w reduces N, wgrad
# dw = dy^T x reduces M. ``dim`` is the tensor's dim that the GEMM reduces; 0 in a block = whole dim.
LAYOUTS = [
    ("rowwise", "input", 1, (1, 0)), ("rowwise", "input", 0, (0, 1)),
    ("rowwise", "weight", 1, (1, 0)), ("rowwise", "weight", 0, (0, 1)),
    ("rowwise", "grad_output", 1, (1, 0)), ("rowwise", "grad_output", 0, (0, 1)),
    ("block", "input", 1, (1, 128)), ("block", "input", 0, (128, 1)),
    ("block", "weight", 1, (128, 128)), ("block", "weight", 0, (128, 128)),  # one cast serves both GEMMs
    ("block", "grad_output", 1, (1, 128)), ("block", "grad_output", 0, (128, 1)),
    ("mx", "input", 1, (1, 32)), ("mx", "weight", 0, (32, 1)), ("mx", "grad_output", 0, (32, 1)),
]


@pytest.mark.parametrize(("granularity", "role", "dim", "block"), LAYOUTS)
def test_operand_block_follows_the_reduction_dim(granularity, role, dim, block):
    assert operand_block(granularity, role, dim) == block


# ---- casts, bit-exact against ml_dtypes per block ------------------------------------------------


def _ref_bias(amax: float, fmax: float) -> int:
    """floor(log2(fmax / amax)) exactly (powers of two are exact in float64)."""
    b = math.floor(math.log2(fmax) - math.log2(amax))
    while amax * 2.0**b > fmax:
        b -= 1
    while amax * 2.0 ** (b + 1) <= fmax:
        b += 1
    return b


def _ref_block_cast(x: np.ndarray, block: tuple[int, int], fmt, margin: int):
    """Per block: bias from the block's amax (zero block: the tensor's bias), codes = ml_dtypes' RNE
    cast of clip(x * 2**bias): (codes as uint8, bias per block)."""
    ml = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}[fmt.name]
    rows, cols = x.shape
    br, bc = block[0] or rows, block[1] or cols
    nbr, nbc = -(-rows // br), -(-cols // bc)
    tensor_bias = _ref_bias(float(np.abs(x).max()), fmt.max) - margin
    bias = np.zeros((nbr, nbc), dtype=np.int64)
    codes = np.zeros(x.shape, dtype=np.uint8)
    for i in range(nbr):
        for j in range(nbc):
            tile = x[i * br:(i + 1) * br, j * bc:(j + 1) * bc].astype(np.float64)
            amax = float(np.abs(tile).max())
            b = _ref_bias(amax, fmt.max) - margin if amax > 0 else tensor_bias
            bias[i, j] = b
            scaled = np.clip(tile * 2.0**b, -fmt.max, fmt.max).astype(np.float32)
            codes[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = scaled.astype(ml).view(np.uint8)
    return codes, bias


CASTS = [  # (granularity, role, dim, shape): ragged shapes leave a partial last block
    ("rowwise", "input", 1, (17, 300)), ("rowwise", "input", 0, (17, 300)),
    ("block", "input", 1, (5, 300)), ("block", "grad_output", 0, (300, 7)),
    ("block", "weight", 1, (200, 300)), ("mx", "input", 1, (9, 100)), ("mx", "weight", 0, (70, 5)),
]


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
@pytest.mark.parametrize(("granularity", "role", "dim", "shape"), CASTS, ids=str)
def test_block_cast_is_bit_exact_against_ml_dtypes(granularity, role, dim, shape, fmt):
    # heavy-tailed rows/blocks: magnitudes spread over 2**-20..2**20, so the blocks' biases differ
    x = torch.randn(shape) * torch.exp2(torch.randint(-20, 21, shape).float())
    x[0, : min(3, shape[1])] = 0.0
    block = operand_block(granularity, role, dim)
    cast = quantize_blocks(x, fmt, block, margin=1, e8m0=granularity == "mx")
    codes, bias = _ref_block_cast(x.numpy(), block, fmt, margin=1)
    assert np.array_equal(cast.tensor.data.view(torch.uint8).numpy(), codes)
    scale_inv = cast.tensor.scale_inv
    assert np.array_equal((-torch.log2(scale_inv.to(torch.float32))).numpy().astype(np.int64), bias)
    if granularity == "mx":  # the stored scale is E8M0: its bits are 127 - bias
        assert scale_inv.dtype == torch.float8_e8m0fnu
        ref_e8m0 = (2.0 ** -bias.astype(np.float64)).astype(np.float32).astype(ml_dtypes.float8_e8m0fnu)
        assert np.array_equal(scale_inv.view(torch.uint8).numpy(), ref_e8m0.view(np.uint8))
        assert np.array_equal(scale_inv.view(torch.uint8).numpy(), (127 - bias).astype(np.uint8))
    else:
        assert scale_inv.dtype == torch.float32


def test_no_block_saturates_and_zero_blocks_take_the_tensor_bias():
    x = torch.randn(4, 256)
    x[1] *= 1e5                   # an outlier row
    x[2, :128] = 0.0              # an all-zero 1x128 block
    cast = quantize_blocks(x, E4M3, (1, 128), margin=0, e8m0=False)
    y = (x * torch.exp2(-torch.log2(cast.tensor.scale_inv)).repeat_interleave(128, 1)).abs()
    assert float(y.max()) <= E4M3.max                      # no block saturates
    assert torch.equal(cast.block_log2_scale[2, 0], cast.log2_scale)  # zero block: the tensor's bias
    assert float(cast.log2_scale) == float(cast.block_log2_scale.min())


def test_all_zero_tensor_keeps_the_previous_bias():
    cast = quantize_blocks(torch.zeros(3, 64), E4M3, (1, 32), margin=0, e8m0=True,
                           prev_log2_scale=torch.tensor(5.0))
    assert torch.all(cast.block_log2_scale == 5.0) and float(cast.log2_scale) == 5.0


@pytest.mark.parametrize("e8m0", [False, True])
def test_a_nonfinite_block_makes_every_scale_inv_nan(e8m0: bool):
    x = torch.randn(4, 64)
    x[3, 50] = math.inf
    cast = quantize_blocks(x, E4M3, (1, 32), margin=0, e8m0=e8m0)
    assert torch.isnan(cast.tensor.scale_inv.to(torch.float32)).all()
    assert torch.isfinite(cast.log2_scale)   # the state keeps a finite bias (the previous one)


# ---- GEMMs ---------------------------------------------------------------------------------------


def _exact_operand(rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """Small integers (|v| <= 7, exact in E4M3 and E5M2 at any power-of-two scale) times a power of
    two per block in 2**[-2, 2]: quantizing loses nothing, and every product is an integer times
    2**-4 of at most 49 * 2**4 units, so a sum of K <= 256 such products stays below 2**24 units:
    fp32 accumulation is exact in any order, and the fp64 reference rounded once equals it."""
    br, bc = block[0] or rows, block[1] or cols
    ints = torch.randint(-7, 8, (rows, cols)).float()
    exps = torch.randint(-2, 3, (-(-rows // br), -(-cols // bc))).float()
    return ints * torch.exp2(exps).repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]


def _ref_dequantized_fp64(t) -> torch.Tensor:
    """codes x scale_inv in float64, from the raw codes and scales (not through Fp8Tensor)."""
    br, bc = t.block
    s = t.scale_inv.to(torch.float64).repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return t.data.to(torch.float64) * s[: t.shape[0], : t.shape[1]]


GEMMS = [  # (granularity, a: role, b: role, M, K, N); a (M, K) and b (K, N) both scaled along K
    ("rowwise", "input", "weight", 24, 256, 40),
    ("block", "input", "weight", 24, 200, 136),       # ragged K: partial last block
    ("block", "grad_output", "input", 24, 256, 40),   # wgrad's layout: both along M
    ("mx", "input", "weight", 8, 100, 40),
    ("mx", "grad_output", "weight", 8, 96, 24),
]


@pytest.mark.parametrize(("granularity", "a_role", "b_role", "m", "k", "n"), GEMMS, ids=str)
def test_emulated_gemm_is_bit_exact_against_fp64_reference(granularity, a_role, b_role, m, k, n):
    # a (M, K) along its dim 1, b stored as (N, K) along its dim 1 then transposed to (K, N)
    a_block, bt_block = operand_block(granularity, a_role, 1), operand_block(granularity, b_role, 1)
    a_hp, bt_hp = _exact_operand(m, k, a_block), _exact_operand(n, k, bt_block)
    e8m0 = granularity == "mx"
    a = quantize_blocks(a_hp, E4M3, a_block, margin=0, e8m0=e8m0).tensor
    b = quantize_blocks(bt_hp, E4M3, bt_block, margin=0, e8m0=e8m0).tensor.t()
    out = fp8_mm(a, b, backend="emulated")
    a64, b64 = _ref_dequantized_fp64(a), _ref_dequantized_fp64(b)
    assert torch.equal(a64, a_hp.double()) and torch.equal(b64, bt_hp.double().t())  # lossless operands
    # tier 1: bit-exact; exact data (see _exact_operand), so one rounding of the fp64 result is the answer
    assert torch.equal(out, (a64 @ b64).to(torch.float32))


@pytest.mark.parametrize("granularity", ["rowwise", "block", "mx"])
def test_emulated_gemm_is_the_fp32_matmul_of_exactly_dequantized_operands(granularity):
    # random data (inexact sums): the emulation is one fp32 matmul of the operands dequantized exactly
    # (codes x power of two, exact in fp32), so it equals torch.mm of the fp64-dequantized operands
    # rounded to fp32 (exact) bit for bit: same values, same fp32 GEMM.
    a_hp, bt_hp = torch.randn(33, 300), torch.randn(70, 300) * 1e3
    e8m0 = granularity == "mx"
    a = quantize_blocks(a_hp, E4M3, operand_block(granularity, "input", 1), margin=0, e8m0=e8m0).tensor
    b = quantize_blocks(bt_hp, E4M3, operand_block(granularity, "weight", 1), margin=0, e8m0=e8m0).tensor.t()
    a32, b32 = _ref_dequantized_fp64(a).float(), _ref_dequantized_fp64(b).float()
    assert torch.equal(_ref_dequantized_fp64(a), a32.double())  # dequantization is exact in fp32
    assert torch.equal(fp8_mm(a, b, backend="emulated"), torch.mm(a32, b32))


SELECT = [  # (a scaling, b scaling, dtypes, out dtype, backend, device, capability) -> engine
    ("tensor", "tensor", "e4m3", torch.bfloat16, "auto", "cuda", (9, 0), "scaled_mm"),
    ("tensor", "tensor", "e4m3", torch.float32, "auto", "cpu", None, "emulated"),
    ("rowwise", "rowwise", "e4m3", torch.bfloat16, "auto", "cuda", (9, 0), "scaled_mm_rowwise"),
    ("rowwise", "rowwise", "e4m3", torch.bfloat16, "auto", "cuda", (10, 0), "scaled_mm_rowwise"),
    ("rowwise", "rowwise", "e4m3", torch.bfloat16, "auto", "cuda", (8, 9), "emulated"),   # Ada: no rowwise
    ("rowwise", "rowwise", "e4m3", torch.float32, "auto", "cuda", (9, 0), "emulated"),   # bf16 out only
    ("rowwise", "rowwise", "e5m2", torch.bfloat16, "auto", "cuda", (9, 0), "emulated"),  # E4M3 x E4M3 only
    ("rowwise", "rowwise", "e4m3", torch.float32, "auto", "cpu", None, "emulated"),
    ("rowwise", "rowwise", "e4m3", torch.float32, "scaled_mm", "cpu", None, "scaled_mm_rowwise"),
    ("rowwise", "rowwise", "e5m2", torch.float32, "scaled_mm", "cpu", None, "emulated"),
    ("block", "block", "e4m3", torch.bfloat16, "auto", "cuda", (9, 0), "emulated"),
    ("mx", "mx", "e4m3", torch.bfloat16, "auto", "cuda", (10, 0), "emulated"),
    ("rowwise", "rowwise", "e4m3", torch.bfloat16, "emulated", "cuda", (9, 0), "emulated"),
]


@pytest.mark.parametrize(("a_kind", "b_kind", "fmt", "out_dtype", "backend", "device", "cap", "engine"),
                         SELECT, ids=str)
def test_gemm_selection_is_cpu_testable(a_kind, b_kind, fmt, out_dtype, backend, device, cap, engine):
    a_dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]  # "e5m2": dy in dgrad
    assert select_gemm(a_kind, b_kind, a_dtype, torch.float8_e4m3fn, out_dtype, backend=backend,
                       device_type=device, capability=cap) == engine


def test_rowwise_scaled_mm_equals_emulated_on_cpu():
    # torch 2.13 runs rowwise torch._scaled_mm on CPU: with exact data (see _exact_operand) both
    # engines give the exact sum, so they agree bit for bit (tier 1); K and N ragged for padding
    block_a, block_bt = operand_block("rowwise", "input", 1), operand_block("rowwise", "weight", 1)
    a = quantize_blocks(_exact_operand(24, 200, block_a), E4M3, block_a, margin=0, e8m0=False).tensor
    b = quantize_blocks(_exact_operand(40, 200, block_bt), E4M3, block_bt, margin=0, e8m0=False).tensor.t()
    native = fp8_mm(a, b, backend="scaled_mm")
    assert torch.equal(native, fp8_mm(a, b, backend="emulated"))
