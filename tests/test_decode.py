"""FP8 -> fp32 decoding (fp8train._decode_cpu): the compiled CPU path and its eager fallback are
bit-exact against torch's own float8 conversion (lossless path: rtol=0, atol=0)."""

from __future__ import annotations

import pytest
import torch

from fp8train._decode_cpu import FAST_DECODE_MIN_NUMEL, decode_fp8_into, mean_of_fp8_rows
from fp8train.formats import E4M3, E5M2


def _finite_codes(fmt, n_rows: int, numel: int) -> torch.Tensor:
    """(n_rows, numel) uint8 codes: every finite code of the format, then random finite ones."""
    every = torch.arange(256, dtype=torch.uint8)
    finite = every[torch.isfinite(every.view(fmt.dtype).float())]
    idx = torch.randint(0, finite.numel(), (n_rows, numel))
    idx[:, :finite.numel()] = torch.arange(finite.numel())
    return finite[idx]


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
@pytest.mark.parametrize("numel", [1000, FAST_DECODE_MIN_NUMEL + 3], ids=["eager", "compiled"])
@pytest.mark.parametrize("n_rows", [1, 2, 3, 4])
def test_mean_of_rows_matches_torch_conversion(fmt, numel, n_rows):
    codes = _finite_codes(fmt, n_rows, numel)
    values = codes.view(fmt.dtype).float()
    expected = values[0]
    for r in range(1, n_rows):  # the documented order: rows summed 0..N-1, then / N
        expected = expected + values[r]
    expected = expected / n_rows
    assert torch.equal(mean_of_fp8_rows(codes, fmt), expected)


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
@pytest.mark.parametrize("numel", [1000, FAST_DECODE_MIN_NUMEL + 3], ids=["eager", "compiled"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("log2_scale", [-7, 0, 12])
def test_decode_into_matches_torch_conversion(fmt, numel, out_dtype, log2_scale):
    codes = _finite_codes(fmt, 1, numel)[0]
    scale_inv = torch.tensor(2.0**-log2_scale)
    out = torch.empty(numel, dtype=out_dtype)
    decode_fp8_into(codes, fmt, scale_inv, out)
    # saturated to out's max (e5m2 * 2**7 exceeds fp16's 65504): a finite mean stays finite
    out_max = torch.finfo(out_dtype).max
    expected = (codes.view(fmt.dtype).float() * scale_inv).clamp(-out_max, out_max).to(out_dtype)
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
