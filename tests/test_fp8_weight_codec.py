"""The pure parts of ZeRO's FP8 weight all-gather (``fp8train.comm.zero._weights``): encoding a weight
to E4M3 with its power-of-two scale (amax edge cases as a table) and the byte layout of the gather
slots. Bit-exact: both are deterministic integer/power-of-two arithmetic."""

from __future__ import annotations

import pytest
import torch

from fp8train.comm.zero._weights import encode_fp8_weights_, plan_weight_slots

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("case, values, prev_log2, log2", [
    ("amax_3", [0.5, -0.25, 3.0], 0.0, 7.0),              # floor(log2(448 / 3)) = 7: 3 * 128 = 384
    ("amax_fits_exactly", [28.0, -1.0], 0.0, 4.0),        # 28 * 16 = 448: the max itself
    ("amax_tiny", [2.0**-20, 0.0], 3.0, 28.0),            # 2**-20 * 2**28 = 256 <= 448 < 512
    ("amax_zero_keeps_previous", [0.0, -0.0], 5.0, 5.0),  # nothing to learn from zeros
    ("inf_keeps_previous", [1.0, INF], 5.0, 5.0),         # overflow upstream: inf clamps to 448
    ("nan_keeps_previous", [1.0, NAN], 5.0, 5.0),
])
def test_encode_amax_cases(case, values, prev_log2, log2):
    w = torch.tensor(values)
    bias = torch.tensor(prev_log2)
    codes, scale_inv = torch.empty(w.shape, dtype=torch.float8_e4m3fn), torch.empty(())
    encode_fp8_weights_([w], [bias], [codes], [scale_inv])
    assert float(bias) == log2 and float(scale_inv) == 2.0**-log2
    expected = (w * 2.0**log2).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    assert torch.equal(codes.view(torch.uint8)[~w.isnan()], expected.view(torch.uint8)[~w.isnan()])
    assert bool(codes.to(torch.float32)[w.isnan()].isnan().all())


@pytest.mark.parametrize("case, nbytes, owner, offsets, slot_bytes", [
    # FP8 parameters take numel + 4 bytes (the scale_inv), every parameter starts 16-aligned
    ("lossless_then_fp8", [40, 4 + 64], [0, 0], [0, 48], 128),
    ("two_ranks_max_slot", [4 + 256, 4 + 16, 1024], [0, 0, 1], [0, 272, 0], 1024),
    ("empty_parameter", [0, 4 + 0, 12], [0, 0, 0], [0, 0, 16], 32),
])
def test_plan_weight_slots(case, nbytes, owner, offsets, slot_bytes):
    order = sorted(range(len(nbytes)), key=lambda i: (owner[i], i))
    assert plan_weight_slots(nbytes, owner, order, max(owner) + 1) == (offsets, slot_bytes)
