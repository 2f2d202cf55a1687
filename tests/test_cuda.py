"""The GPU paths: run where CUDA is present (skipped, and reported as skipped, on CPU-only CI).

On CPU the same logic is covered by test_linear.py (scaled_mm runs on CPU in torch >= 2.13) and
test_te_converter.py (with a stand-in for Transformer Engine); here the real sm89+ FP8 tensor-core
path and the CUDA cast are checked against the CPU emulation, and the real Transformer Engine
converter's scaling state against a checkpoint round-trip.
"""

from __future__ import annotations

import pytest
import torch
from conftest import sqnr_db

from fp8train import E4M3, E5M2, Fp8Config, Fp8Linear, convert_to_te, fp8_mm, quantize
from fp8train.cast import cast_to_fp8_reference
from fp8train.gemm import resolve_backend, supports_scaled_mm
from fp8train.te import te_forward_context

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_cuda_cast_is_bit_identical_to_the_cpu_cast(fmt) -> None:
    x = torch.randn(1 << 20) * 1000
    x[::1001] = float("nan")
    scale = torch.tensor(2.0**-3)
    cpu = cast_to_fp8_reference(x, scale, fmt).view(torch.uint8)
    gpu = cast_to_fp8_reference(x.to(CUDA), scale.to(CUDA), fmt).view(torch.uint8).cpu()
    nan = x.isnan()
    assert torch.equal(cpu[~nan], gpu[~nan])
    assert gpu.view(fmt.dtype).float()[nan].isnan().all()


@pytest.mark.skipif(not torch.cuda.is_available() or not supports_scaled_mm(torch.device("cuda")),
                    reason="needs CUDA compute capability >= 8.9")
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_the_triton_cast_kernel_is_bit_identical_to_the_cpu_cast(fmt) -> None:
    """The hand-written kernel's rounding (checked only for exact values under the CPU interpreter,
    whose float8 conversion is not faithful): every code, its transpose and the amax, on values
    spanning the whole range with ties, subnormals, saturation, inf and NaN."""
    from fp8train._cast_triton import triton_cast_into
    from fp8train.scaling import tensor_to_amax

    x = torch.exp2(torch.empty(1000, 3001).uniform_(-40, 20)) * torch.where(torch.rand(1000, 3001) < 0.5, -1.0, 1.0)
    x.view(-1)[:4096] = torch.arange(4096, dtype=torch.float32) * fmt.min_subnormal / 2
    for special in (float("inf"), -float("inf"), float("nan")):
        x_special = x.clone()
        x_special[7, 11] = special
        for dtype in (torch.float32, torch.bfloat16):
            x_hp = x_special.to(dtype)
            scale = torch.tensor(2.0**-3)
            cpu = cast_to_fp8_reference(x_hp, scale, fmt).view(torch.uint8)
            x_gpu = x_hp.to(CUDA)
            out = torch.empty(x_hp.shape, dtype=fmt.dtype, device=CUDA)
            out_t = torch.empty(x_hp.shape[::-1], dtype=fmt.dtype, device=CUDA)
            amax = torch.empty((), device=CUDA)
            triton_cast_into(x_gpu, scale.to(CUDA), fmt, out, out_t=out_t, amax_out=amax)
            nan = x_hp.float().isnan()
            assert torch.equal(out.view(torch.uint8).cpu()[~nan], cpu[~nan]), (dtype, special)
            assert torch.equal(out_t.view(torch.uint8).cpu(), out.view(torch.uint8).cpu().t())
            torch.testing.assert_close(amax.cpu(), tensor_to_amax(x_hp), rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available() or not supports_scaled_mm(torch.device("cuda")),
                    reason="needs CUDA compute capability >= 8.9")
@pytest.mark.parametrize(("m", "k", "n"), [(256, 512, 384), (100, 40, 24)])
def test_tensor_core_gemm_matches_cpu_emulation(m: int, k: int, n: int) -> None:
    a = quantize(torch.randn(m, k), E4M3)
    b = quantize(torch.randn(k, n), E4M3)
    g = quantize(torch.randn(m, n) * 1e-3, E5M2)
    assert resolve_backend("auto", CUDA) == "scaled_mm"
    for x, y in [(a, b), (g, b.t()), (g.t(), a)]:
        ref = fp8_mm(x, y, backend="emulated")
        x_gpu = type(x)(data=x.data.to(CUDA), scale_inv=x.scale_inv.to(CUDA), orig_dtype=x.orig_dtype)
        y_gpu = type(y)(data=y.data.to(CUDA), scale_inv=y.scale_inv.to(CUDA), orig_dtype=y.orig_dtype)
        got = fp8_mm(x_gpu, y_gpu, backend="scaled_mm").cpu()
        # Exact FP8 products, but Hopper's FP8 tensor cores accumulate with fewer than fp32's 24
        # significant bits between promotions (about 14 bits reported for H800), so element-wise
        # fp32 tolerances do not hold near cancellations. Normwise: 2**-14 per add over a random
        # walk of K terms gives ~sqrt(K) * 6e-5 = 1.4e-3 at K=512; the bound is 4e-3, still ~10x
        # below FP8 quantization noise itself (29 dB = 3.5e-2).
        rel_err = ((got - ref).norm() / ref.norm()).item()
        assert rel_err < 4e-3, rel_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_on_cuda_meets_the_cpu_sqnr_floors(dtype: torch.dtype) -> None:
    layer = Fp8Linear(256, 512, config=Fp8Config(backend="auto"), device=CUDA)
    x = torch.randn(8, 64, 256, device=CUDA).to(dtype).requires_grad_()
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    w64 = layer.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y64 = x64 @ w64.t() + layer.bias.detach().double()
    y64.backward(dy.double())
    assert y.dtype == dtype
    assert sqnr_db(y64, y) > 26.0  # floors derived in test_linear.py
    assert sqnr_db(x64.grad, x.grad) > 22.0
    assert sqnr_db(w64.grad, layer.weight.grad) > 22.0
    # a 512-term fp32 sum of N(0,1) values (|sum| ~ 22, ulp ~ 2e-6) in another order: rounding
    # error grows like sqrt(n) ulps, so allow 1e-4 absolute (tier 3 with the sum's own scale)
    torch.testing.assert_close(layer.bias.grad.double(), dy.double().sum((0, 1)), rtol=1e-5, atol=1e-4)


def test_fp8_adamw_on_cuda_follows_the_cpu_optimizer() -> None:
    from fp8train.optim import Fp8AdamW

    shapes = [(64, 48), (300,), (16, 16, 3)]
    params_cpu = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    params_gpu = [torch.nn.Parameter(p.detach().to(CUDA)) for p in params_cpu]
    opt_cpu, opt_gpu = Fp8AdamW(params_cpu, lr=1e-2), Fp8AdamW(params_gpu, lr=1e-2)
    for _ in range(10):
        for p_cpu, p_gpu in zip(params_cpu, params_gpu):
            grad = torch.randn(p_cpu.shape)
            p_cpu.grad, p_gpu.grad = grad, grad.to(CUDA)
        opt_cpu.step()
        opt_gpu.step()
    for p_cpu, p_gpu in zip(params_cpu, params_gpu):
        # The same operation sequence on both devices; a last-ulp difference (e.g. in a libm call)
        # can flip one e4m3/fp16 rounding, which moves that element by one fp16 ulp of the master
        # (~1e-3 relative). Normwise the trajectories must agree far tighter than FP8 noise.
        rel = ((p_gpu.detach().cpu() - p_cpu.detach()).norm() / p_cpu.detach().norm()).item()
        assert rel < 1e-3, rel
    assert opt_gpu.skipped_steps == 0


def test_fp8_adamw_compiled_on_cuda_is_bit_identical_to_its_eager_foreach_step() -> None:
    """The CUDA default (compiled foreach, Triton) against eager foreach on the same GPU: the same
    fp32 operations in the same order, FMA contraction or not (tested bit-exact on CPU)."""
    from fp8train.optim import Fp8AdamW

    shapes = [(64, 48), (300,), (16, 16, 3), (4096, 1024)]
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=CUDA)) for s in shapes]
        opt = Fp8AdamW(params, lr=1e-2, compiled=compiled)
        gen = torch.Generator(device=CUDA).manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, device=CUDA, generator=gen) * 1e-3
            opt.step()
        runs.append([p.detach().clone() for p in params] + [v for p in params for v in opt.state[p].values()])
    for a, b in zip(*runs):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_the_inductor_triton_cast_is_bit_identical_to_the_cpu_cast(fmt) -> None:
    """Inside torch.compile the cast is inductor's (Triton on CUDA): the same codes as the CPU
    reference, edge cases included (ties, subnormals, saturation, inf, NaN)."""
    from fp8train.cast import cast_to_fp8

    x = torch.exp2(torch.empty(1 << 22).uniform_(-40, 20)) * torch.where(torch.rand(1 << 22) < 0.5, -1.0, 1.0)
    x[:4096] = torch.arange(4096, dtype=torch.float32) * fmt.min_subnormal / 2  # ties to even
    x[4096:4100] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0])
    compiled = torch.compile(cast_to_fp8, fullgraph=True, dynamic=False)
    for log2_scale in (-8, 0, 5):
        scale = torch.tensor(2.0**log2_scale)
        cpu = cast_to_fp8_reference(x, scale, fmt).view(torch.uint8)
        gpu = compiled(x.to(CUDA), scale.to(CUDA), fmt).view(torch.uint8).cpu()
        nan = x.isnan()
        assert torch.equal(cpu[~nan], gpu[~nan]), log2_scale


@pytest.mark.skipif(not torch.cuda.is_available() or not supports_scaled_mm(torch.device("cuda")),
                    reason="needs CUDA compute capability >= 8.9")
def test_an_fp8_weight_tensor_feeds_the_tensor_cores_as_its_dequantized_weight_does() -> None:
    """FSDP2's FP8 primary weight (fp8train/weight_tensor.py) on the scaled_mm path (transposed codes for
    column-major b): output and gradients equal a layer holding the dequantized weight, eager and compiled."""
    from fp8train.scaling import amax_to_log2_scale, tensor_to_amax
    from fp8train.weight_tensor import Fp8WeightTensor

    torch.manual_seed(0)
    ref = Fp8Linear(512, 256, bias=False, config=Fp8Config(backend="scaled_mm"), device=CUDA, dtype=torch.bfloat16)
    w = ref.weight.detach()
    stored = Fp8WeightTensor.from_high_precision(w, amax_to_log2_scale(tensor_to_amax(w), E4M3))
    with torch.no_grad():
        ref.weight.copy_(stored.dequantize())
    x = torch.randn(64, 512, device=CUDA, dtype=torch.bfloat16)
    y_ref = ref(x)
    y_ref.float().square().sum().backward()
    for compiled in (False, True):
        layer = Fp8Linear(512, 256, bias=False, config=Fp8Config(backend="scaled_mm"), device=CUDA,
                          dtype=torch.bfloat16)
        layer.weight = torch.nn.Parameter(stored)
        y = (torch.compile(layer) if compiled else layer)(x)
        y.float().square().sum().backward()
        assert torch.equal(y, y_ref), compiled
        assert torch.equal(layer.weight.grad, ref.weight.grad), compiled


@pytest.mark.skipif(not torch.cuda.is_available() or not supports_scaled_mm(torch.device("cuda")),
                    reason="needs CUDA compute capability >= 8.9")
@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_a_compiled_fp8_llama_on_cuda_trains_like_eager(recipe: str) -> None:
    """fullgraph compile of a converted Llama on the tensor-core path under bf16 autocast (the
    trainer's FP8 presets on CUDA): the same scaling biases as eager, close losses."""
    from fp8train import convert_to_fp8
    from fp8train.models import Llama, LlamaConfig

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, block_size=256, n_layer=2, n_head=8, n_kv_head=4, n_embd=512)
        return convert_to_fp8(Llama(cfg), config=Fp8Config(recipe=recipe)).to(CUDA)

    eager, compiled = model(), model()
    forward = torch.compile(compiled, fullgraph=True)
    tokens = torch.randint(0, 256, (4, 257), device=CUDA)
    for _ in range(3):
        losses = []
        for m, f in ((eager, eager), (compiled, forward)):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = f(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 2e-2 * losses[0], losses  # bf16 rounding, fused differently
        biases = [{k: v for k, v in m.state_dict().items() if k.endswith("log2_scale")} for m in (eager, compiled)]
        assert biases[0].keys() == biases[1].keys()
        differing = [k for k in biases[0] if not torch.equal(biases[0][k], biases[1][k])]
        assert len(differing) <= len(biases[0]) // 20, differing  # a bf16 amax near a power of two may flip


def _has_te() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401, PLC0415
    except (ImportError, RuntimeError, OSError):
        return False
    return True


@pytest.mark.skipif(not torch.cuda.is_available() or not _has_te(),
                    reason="needs Transformer Engine (pip install 'fp8train[te]') on CUDA")
def test_te_converter_checkpoints_its_delayed_scaling_state() -> None:
    config = Fp8Config(recipe="delayed", amax_history_len=4)

    def net() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256),
                                   torch.nn.Linear(256, 128)).to(CUDA)   # the last: head, kept

    a = convert_to_te(net(), config=config)
    assert [type(m).__module__.split(".")[0] for m in a] == ["transformer_engine", "torch", "transformer_engine",
                                                            "torch"]
    forward_ctx = te_forward_context(config)
    x = torch.randn(64, 256, device=CUDA)
    for step in range(3):  # amaxes of 1x, 2x, 3x the input: a history far from TE's initial scale 1
        with forward_ctx():
            y = a(x * (step + 1))
        y.pow(2).mean().backward()
    state = a.state_dict()
    assert {"0._extra_state", "2._extra_state"} <= state.keys()
    b = convert_to_te(net(), config=config)
    b.load_state_dict(state)
    with torch.no_grad():
        with forward_ctx():
            y_a = a(x)
        with forward_ctx():
            y_b = b(x)
        with forward_ctx():
            y0 = a[0](x)
    # the same weights and the restored amax history give the same scales: bit-identical (tier 1);
    # without the history b would cast with scale 1 and differ
    assert torch.equal(y_a, y_b)
    y0_64 = x.double() @ a[0].weight.detach().double().t() + a[0].bias.detach().double()
    assert sqnr_db(y0_64, y0) > 26.0  # E4M3 x E4M3 forward: the floor derived in test_linear.py
