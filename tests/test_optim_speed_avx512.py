"""The fused kernel's AVX-512 store loop (optim/csrc/fp8adamw_loop16.h): built where torch reports AVX-512,
and bit-identical to the foreach path (and so to the AVX2 and portable loops) for every combination it
specialises, on sizes that put elements in each loop: whole 16-vectors, an 8-vector, staged tails, and a
tensor over one 64 Ki chunk (chunks start their own vector runs).

Tolerance tier: bit-exact (the same fp32 operations in the same order, whichever loop runs an element).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from fp8train.optim import Fp8AdamW
from fp8train.optim._kernel import load_kernel

needs_kernel = pytest.mark.skipif(load_kernel() is None, reason="no C compiler")
SIZES = (1, 7, 8, 15, 16, 17, 24, 31, 40, 1000, 65536 + 16 + 8 + 3)
SPECIALISED = [  # (parameter dtype, master dtype): the combinations with e4m3 m and fp16 v
    (torch.float32, torch.float16), (torch.bfloat16, torch.float16), (torch.float32, None),
    (torch.bfloat16, None), (torch.bfloat16, torch.float32)]


@needs_kernel
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="torch reports no AVX-512 here")
def test_the_kernel_has_the_avx512_loop_where_torch_reports_avx512() -> None:
    assert load_kernel().fp8adamw_vector_lanes() == 16
    assert load_kernel(portable=True).fp8adamw_vector_lanes() == 1


def _run(fused: bool, param_dtype: torch.dtype, master_dtype, rounding: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [nn.Parameter((torch.randn(n) * s).to(param_dtype)) for n, s in zip(SIZES, [0.02, 1.0, 3.0] * 4)]
    opt = Fp8AdamW(params, lr=0.01, betas=(0.8, 0.95), master_dtype=master_dtype, rounding=rounding, seed=5,
                   fused=fused)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        for p in params:  # steps 2-3: a few huge / tiny elements so the big/small statistics both see lanes
            g = torch.randn(p.shape, generator=gen) * (10.0 ** (-step))
            g[:: 5] *= 1e-6 if step % 2 else 1e3
            p.grad = g.to(param_dtype)
        opt.step()
        assert not opt.last_step_skipped
    out = [p.detach().clone() for p in params]
    for state in opt.state.values():
        out += [v.detach().clone() for v in state.values() if torch.is_tensor(v)]
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)


@needs_kernel
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("param_dtype,master_dtype", SPECIALISED, ids=[f"{p}-{m}" for p, m in SPECIALISED])
def test_avx512_store_loop_is_bit_identical_to_the_foreach_path(param_dtype, master_dtype, rounding) -> None:
    eager = _run(False, param_dtype, master_dtype, rounding)
    fused = _run(True, param_dtype, master_dtype, rounding)
    for a, b in zip(eager, fused, strict=True):
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def test_the_kernel_source_is_one_unit_holding_every_c_file() -> None:
    # the build compiles one temporary file, and the cache key hashes its text: every header must be in it
    import importlib.resources

    from fp8train.optim._kernel import _source

    csrc = importlib.resources.files("fp8train.optim").joinpath("csrc")
    headers = sorted(p.name for p in csrc.iterdir() if p.name.endswith(".h"))
    assert len(headers) >= 4
    text = _source()
    assert '#include "' not in text
    for name in headers:
        # each header's own includes come earlier in fp8adamw.c: inlined there, empty here
        body = re.sub(r'^#include ".*"$', "", csrc.joinpath(name).read_text(), flags=re.MULTILINE)
        assert body in text, name


@needs_kernel
@pytest.mark.parametrize("n", [1, 15, 16, 63, 64, 65, 1000, 65536 + 77])
def test_the_kernels_grad_amax_is_max_abs_with_nan_as_inf_wherever_the_extreme_lies(n) -> None:
    # the AVX-512 read runs four equal parts of a chunk at once, then the tail: an extreme in any of them counts
    from fp8train.optim._bucket import Bucket

    gen = torch.Generator().manual_seed(n)
    for where in sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1}):
        for extreme in (-7.5, float("inf"), float("nan")):
            params = [nn.Parameter(torch.zeros(n)), nn.Parameter(torch.zeros(3))]
            opt = Fp8AdamW(params, fused=True)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            params[0].grad[where] = extreme
            bucket = next(b for b in opt._buckets(opt.param_groups[0]) if isinstance(b, Bucket))
            amax = torch.stack([p.grad.abs().max() for p in params])
            expected = torch.where(amax.isnan(), float("inf"), amax)
            assert bucket.fused and torch.equal(bucket.grad_amax(), expected)


@needs_kernel
def test_a_moment_scale_too_coarse_for_the_folded_decode_takes_the_8_lane_loop_with_the_same_bits() -> None:
    # the 16-lane loop decodes m with one multiply by 2**8 * scale_inv; where that product overflows (a scale of
    # 2**-121 here, forced) it must not run: zero codes would decode to 0 * inf = NaN and the step would be lost
    def run(fused: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(100))]
        opt = Fp8AdamW(params, fused=fused)
        for step in range(3):
            params[0].grad = torch.full((100,), 1e-3 * (step + 1))
            if step == 2:
                state = opt.state[params[0]]
                state["exp_avg_scaled"].zero_()
                state["exp_avg_log2_scale"].fill_(-121.0)
            opt.step()
            assert not opt.last_step_skipped
        return [params[0].detach().clone(), *(v.clone() for v in opt.state[params[0]].values() if torch.is_tensor(v))]

    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(_bits(a), _bits(b))
    assert torch.isfinite(run(True)[0]).all()
