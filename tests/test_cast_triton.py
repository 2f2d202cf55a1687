"""The Triton FP8 cast (fp8train/_cast_triton.py) under Triton's CPU interpreter, against the eager
reference cast and ``tensor_to_amax`` bit for bit (tier 1: the cast is a deterministic function).

The interpreter's own float->fp8 conversion is not faithful (it rounds ties away from zero, drops the
mantissa carry: E4M3 1.9375 -> 1.0, and turns NaN into 0x7C, inf into 0x78): so the checks test the
kernel's logic -- addressing, tails, the transposed copy, clamp, NaN, signed zero, amax -- on inputs
that need no rounding (FP8 grid values times 2**-k, cast with scale 2**k), not the hardware rounding
(tests/test_cuda.py does that on a GPU).

TRITON_INTERPRET must be set before triton is imported, and another test in the same pytest process
may have imported it already (torch._inductor does), so the checks run in one subprocess: this file
run as a script (``TRITON_INTERPRET=1 python tests/test_cast_triton.py``) prints one JSON object,
check name -> "ok" or the failure. Without triton (a dev dependency) every check fails.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import traceback
from collections.abc import Callable

import pytest
import torch

from fp8train import E4M3, E5M2, Fp8Format
from fp8train._cast_triton import triton_cast_into, triton_cast_supported
from fp8train.cast import cast_to_fp8_reference
from fp8train.scaling import tensor_to_amax

FORMATS = (E4M3, E5M2)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# power-of-two scales 2**k for which grid * 2**-k fits the input dtype exactly (fp16: 2**-24 .. 65504)
LOG2_SCALES = {torch.float32: (-20, -3, 0, 5, 24), torch.bfloat16: (-20, 0, 24), torch.float16: (0, 3, 8)}
# odd sizes: flat tiles are 4096 elements, transposed tiles 64 x 64; tails in every direction
SHAPES = ((1,), (2 * 4096 + 37,), (130, 67), (1, 300), (67, 1), (64, 64))


def _codes(x_fp8: torch.Tensor) -> torch.Tensor:
    return x_fp8.view(torch.uint8)


def _cast(x: torch.Tensor, scale: torch.Tensor, fmt: Fp8Format, *, transpose: bool, amax: bool):
    out = torch.empty(x.shape, dtype=fmt.dtype)
    out_t = torch.empty(x.shape[::-1], dtype=fmt.dtype) if transpose else None
    amax_out = torch.tensor(float("nan")) if amax else None  # garbage: must be overwritten
    triton_cast_into(x, scale, fmt, out, out_t=out_t, amax_out=amax_out)
    return out, out_t, amax_out


def _grid_values(fmt: Fp8Format) -> torch.Tensor:
    """Every finite FP8 value (-0 included): casting them needs no rounding."""
    values = torch.arange(256, dtype=torch.uint8).view(fmt.dtype).to(torch.float32)
    return values[values.isfinite()]


def check_exact_grid_values_match_the_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    for fmt in FORMATS:
        grid = _grid_values(fmt)
        for dtype in DTYPES:
            for log2_scale in LOG2_SCALES[dtype]:
                for shape in SHAPES:
                    numel = math.prod(shape)
                    y = grid[torch.randint(len(grid), (numel,), generator=gen)]
                    y[: len(grid)] = grid[:numel]  # every value at least once where there is room
                    x = (y * 2.0**-log2_scale).to(dtype).reshape(shape)
                    assert torch.equal(x.float().reshape(-1) * 2.0**log2_scale, y), "test input not exact"
                    scale = torch.tensor(2.0**log2_scale)
                    case = (fmt.name, dtype, log2_scale, shape)
                    out, out_t, _ = _cast(x, scale, fmt, transpose=len(shape) == 2, amax=False)
                    assert torch.equal(_codes(out), _codes(cast_to_fp8_reference(x, scale, fmt))), case
                    assert out_t is None or torch.equal(_codes(out_t), _codes(out).t()), case


def _edge_table(fmt: Fp8Format) -> list[tuple[str, float, float]]:
    """(case, y = x * scale, documented output) -- the contract in fp8train/cast.py."""
    return [
        ("fmax", fmt.max, fmt.max),
        ("1.5 fmax saturates", 1.5 * fmt.max, fmt.max),
        ("-16 fmax saturates", -16 * fmt.max, -fmt.max),
        ("+inf saturates to fmax", math.inf, fmt.max),
        ("-inf saturates to -fmax", -math.inf, -fmt.max),
        ("nan stays nan", math.nan, math.nan),
        ("zero", 0.0, 0.0),
        ("negative zero keeps its sign", -0.0, -0.0),
        ("smallest subnormal", fmt.min_subnormal, fmt.min_subnormal),
        ("-smallest normal", -fmt.min_normal, -fmt.min_normal),
    ]


def check_edge_table_clamp_nan_signed_zero() -> None:
    for fmt in FORMATS:
        table = _edge_table(fmt)
        for dtype in DTYPES:
            log2_scale = 3  # fp16 holds 16 * E5M2's fmax / 8 only as inf: still saturates
            x = (torch.tensor([y for _, y, _ in table]) * 2.0**-log2_scale).to(dtype)
            x = x.repeat(37)[: 11 * 31].reshape(11, 31)  # every case in several tiles' positions
            scale = torch.tensor(2.0**log2_scale)
            out, out_t, _ = _cast(x, scale, fmt, transpose=True, amax=False)
            got = out.float().reshape(-1)
            ref = cast_to_fp8_reference(x, scale, fmt)
            for i, (case, _, expected) in enumerate(table * 37):
                if i >= got.numel():
                    break
                if math.isnan(expected):  # the NaN's sign is not part of the contract
                    assert got[i].isnan(), (fmt.name, dtype, case)
                    continue
                assert got[i].item() == expected, (fmt.name, dtype, case, got[i].item())
                assert bool(got[i].signbit()) == (math.copysign(1.0, expected) < 0), (fmt.name, dtype, case)
                assert _codes(out).reshape(-1)[i] == _codes(ref).reshape(-1)[i], (fmt.name, dtype, case)
            assert torch.equal(_codes(out_t), _codes(out).t()), (fmt.name, dtype)


def check_transposed_copy_equals_out_t_on_random_values() -> None:
    # rounding happens here (random values): only out_t == out.t() is asserted, not the codes
    for shape in ((130, 67), (64, 64), (1, 300), (300, 1), (65, 129), (0, 5)):
        x = torch.randn(shape) * 100
        out, out_t, _ = _cast(x, torch.tensor(0.5), E4M3, transpose=True, amax=False)
        assert torch.equal(_codes(out_t), _codes(out).t()), shape


def _amax_table() -> dict[str, torch.Tensor]:
    n = 2 * 4096 + 37
    x = torch.randn(n) * 7
    table = {"random fp32": x, "random bf16": x.bfloat16(), "random fp16": x.half(),
             "random 2-D": x[: 130 * 63].reshape(130, 63), "empty": x[:0], "empty 2-D": x[:0].reshape(0, 3),
             "all zero": torch.zeros(n), "all -0": torch.full((n,), -0.0), "fp32 subnormals": torch.full((5,), -1e-40),
             "largest magnitude negative": torch.cat([x, torch.tensor([-1e30])]),
             # every bit of |x| counts: the largest value's last mantissa bit is 1
             "odd last mantissa bit": torch.cat([x, torch.tensor([-100.0]).nextafter(torch.tensor([-math.inf]))])}
    for name, value in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)):
        for where, i in (("first tile", 3), ("tail tile", n - 1)):
            with_special = x.clone()
            with_special[i] = value
            table[f"{name} in the {where}"] = with_special
    nan_and_inf = x.clone()
    nan_and_inf[[5, n - 2]] = torch.tensor([math.inf, math.nan])
    table["inf and nan"] = nan_and_inf
    table["nan fp16 2-D"] = table["nan in the tail tile"][: 64 * 128].half().reshape(64, 128)
    return table


def check_amax_equals_tensor_to_amax() -> None:
    for name, x in _amax_table().items():
        for transpose in (False, True) if x.dim() == 2 else (False,):
            _, _, amax = _cast(x, torch.tensor(1.0), E5M2, transpose=transpose, amax=True)
            expected = tensor_to_amax(x)
            assert amax.isnan() == expected.isnan(), (name, amax, expected)
            assert expected.isnan() or torch.equal(amax, expected), (name, transpose, amax, expected)


def _error(call: Callable[[], None]) -> str:
    try:
        call()
    except ValueError as err:
        return str(err)
    raise AssertionError("no ValueError")


def check_wrapper_errors_name_the_argument_and_allowed_values() -> None:
    x, scale = torch.zeros(3, 5), torch.tensor(1.0)
    e4m3 = torch.float8_e4m3fn
    cases = {  # the argument -> a call with it wrong, the allowed value named in the message
        "out": (lambda: triton_cast_into(x, scale, E4M3, torch.empty(3, 5, dtype=torch.float8_e5m2)),
                "out must be a contiguous torch.float8_e4m3fn tensor of shape (3, 5) on cpu"),
        "out shape": (lambda: triton_cast_into(x, scale, E4M3, torch.empty(5, 3, dtype=e4m3)),
                      "out must be a contiguous torch.float8_e4m3fn tensor of shape (3, 5)"),
        "out_t": (lambda: triton_cast_into(x, scale, "e4m3", torch.empty(3, 5, dtype=e4m3),
                                           out_t=torch.empty(3, 5, dtype=e4m3)),
                  "out_t must be a contiguous torch.float8_e4m3fn tensor of shape (5, 3)"),
        "out_t of 1-D x": (lambda: triton_cast_into(x[0], scale, E4M3, torch.empty(5, dtype=e4m3),
                                                    out_t=torch.empty(5, dtype=e4m3)), "out_t needs a 2-D x_hp"),
        "amax_out": (lambda: triton_cast_into(x, scale, E4M3, torch.empty(3, 5, dtype=e4m3),
                                              amax_out=torch.zeros(1)),
                     "amax_out must be a contiguous torch.float32 tensor of shape () on cpu"),
        "scale": (lambda: triton_cast_into(x, scale.double(), E4M3, torch.empty(3, 5, dtype=e4m3)),
                  "scale must be a contiguous torch.float32 tensor of shape () on cpu"),
        "x_hp": (lambda: triton_cast_into(x.double(), scale, E4M3, torch.empty(3, 5, dtype=e4m3)),
                 "x_hp must be a contiguous 1-D or 2-D float32/bfloat16/float16 tensor"),
    }
    for name, (call, expected) in cases.items():
        message = _error(call)
        assert message.startswith(expected) and "\n" not in message, (name, message)


CHECKS = (check_exact_grid_values_match_the_reference, check_edge_table_clamp_nan_signed_zero,
          check_transposed_copy_equals_out_t_on_random_values, check_amax_equals_tensor_to_amax,
          check_wrapper_errors_name_the_argument_and_allowed_values)


def _run_checks() -> dict[str, str]:
    results = {}
    for check in CHECKS:
        try:
            check()
            results[check.__name__] = "ok"
        except Exception:  # noqa: BLE001 -- reported to the pytest process, which fails the test
            results[check.__name__] = traceback.format_exc(limit=3)
    return results


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=240,
                          check=False)  # the stderr goes into the assertion
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", [check.__name__ for check in CHECKS])
def test_triton_cast_under_the_interpreter(interpreter_results: dict[str, str], name: str) -> None:
    assert interpreter_results[name] == "ok", interpreter_results[name]


def test_triton_is_installed() -> None:
    import importlib.util

    assert importlib.util.find_spec("triton") is not None, "triton is a dev dependency: pip install -e '.[dev]'"


def test_importing_fp8train_does_not_import_triton() -> None:
    code = "import sys, fp8train, fp8train._cast_triton, fp8train.cast; print('triton' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "False"


SUPPORTED = {  # (name, tensor, TRITON_INTERPRET set, supported)
    "cpu without the interpreter": (torch.zeros(4, 4), False, False),
    "fp32 2-D": (torch.zeros(4, 4), True, True),
    "bf16 1-D": (torch.zeros(4, dtype=torch.bfloat16), True, True),
    "fp16 2-D": (torch.zeros(4, 4, dtype=torch.float16), True, True),
    "fp64": (torch.zeros(4, dtype=torch.float64), True, False),
    "3-D": (torch.zeros(2, 2, 2), True, False),
    "non-contiguous": (torch.zeros(4, 4).t(), True, False),
}


@pytest.mark.parametrize(("x", "interpret", "supported"), SUPPORTED.values(), ids=SUPPORTED.keys())
def test_triton_cast_supported(x: torch.Tensor, interpret: bool, supported: bool,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    # only reads the variable and looks triton up: nothing is imported in this process
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_cast_supported(x) is supported


if __name__ == "__main__":
    print(json.dumps(_run_checks()))
