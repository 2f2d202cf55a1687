"""``Fp8WeightTensor`` (fp8train/weight_tensor.py), one process: the values it reports are its codes times
scale_inv; views share codes and scale; factories give a shard (``new_zeros``) or a plain tensor
(``zeros_like``); ``copy_`` in all three directions; in-place arithmetic is refused; FSDP2's all-gather hooks
pad an uneven shard from FSDP2's own buffer; and an ``Fp8Linear`` whose weight is one computes exactly what it
computes with the dequantized high-precision weight (the current recipe's cast of on-grid values is exact)."""

from __future__ import annotations

import pytest
import torch

from fp8train.cast import cast_to_fp8_reference
from fp8train.formats import E4M3
from fp8train.scaling import amax_to_log2_scale, tensor_to_amax
from fp8train.weight_tensor import Fp8WeightTensor


def _weight(rows: int = 6, cols: int = 32, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def _fp8(w: torch.Tensor) -> Fp8WeightTensor:
    return Fp8WeightTensor.from_high_precision(w, amax_to_log2_scale(tensor_to_amax(w), E4M3))


def test_reports_the_high_precision_dtype_and_decodes_to_the_e4m3_round_trip():
    w = _weight()
    t = _fp8(w)
    assert t.dtype == torch.bfloat16 and t.shape == w.shape and t.codes.dtype == E4M3.dtype
    scale = torch.exp2(amax_to_log2_scale(tensor_to_amax(w), E4M3))
    assert torch.equal(t.codes, cast_to_fp8_reference(w, scale, E4M3))
    expected = (cast_to_fp8_reference(w, scale, E4M3).to(torch.float32) / scale).to(torch.bfloat16)
    assert torch.equal(t.dequantize(), expected)
    assert float(t.scale_inv) == float(1 / scale)
    assert torch.equal(t + 1, expected + 1), "an out-of-place operator sees the dequantized values"
    assert torch.equal(torch.cat([t, t]), torch.cat([expected, expected])), "tensor lists too"
    as_fp32 = t.to(torch.float32)
    assert type(as_fp32) is torch.Tensor and torch.equal(as_fp32, expected.to(torch.float32))


def test_views_share_codes_and_scale():
    t = _fp8(_weight(rows=8))
    for view in (t.narrow(0, 2, 4), t[2:6], t.view(-1), t.detach(), *t.split(4), *torch.chunk(t, 2)):
        assert isinstance(view, Fp8WeightTensor)
        assert view.codes.untyped_storage().data_ptr() == t.codes.untyped_storage().data_ptr()
        assert view.scale_inv is t.scale_inv
    assert torch.equal(t.narrow(0, 2, 4).dequantize(), t.dequantize()[2:6])


def test_new_zeros_is_a_shard_and_zeros_like_a_plain_tensor():
    t = _fp8(_weight())
    padded = t.new_zeros((8, 32))
    assert isinstance(padded, Fp8WeightTensor) and padded.dtype == torch.bfloat16
    assert torch.equal(padded.dequantize(), torch.zeros(8, 32, dtype=torch.bfloat16))
    for plain in (torch.zeros_like(t), torch.empty_like(t, dtype=torch.float8_e4m3fn), torch.ones_like(t)):
        assert type(plain) is torch.Tensor and plain.shape == t.shape
    assert torch.zeros_like(t).dtype == torch.bfloat16


def test_copy_between_shards_from_values_and_into_values():
    src, dst = _fp8(_weight(seed=1)), _fp8(_weight(seed=2) * 10)
    dst.copy_(src)
    assert torch.equal(dst.codes.view(torch.uint8), src.codes.view(torch.uint8))
    assert torch.equal(dst.scale_inv, src.scale_inv) and dst.scale_inv is not src.scale_inv
    # values already on an E4M3 grid (a checkpoint's dequantized weight) come back exactly, at any scale
    on_grid = _fp8(_weight(seed=3)).dequantize()
    target = _fp8(_weight(seed=4) * 1000)
    target.copy_(on_grid)
    assert torch.equal(target.dequantize(), on_grid)
    plain = torch.empty(6, 32, dtype=torch.float32)
    plain.copy_(src)
    assert torch.equal(plain, src.dequantize(torch.float32))


def test_in_place_arithmetic_is_refused():
    t = _fp8(_weight())
    with pytest.raises(NotImplementedError, match="in-place operator"):
        t.add_(1)
    with pytest.raises(NotImplementedError, match="in-place operator"):
        t.mul_(2)


def test_store_writes_codes_at_the_given_scale():
    t = _fp8(_weight())
    new = _weight(seed=5) * 3
    log2_scale = amax_to_log2_scale(tensor_to_amax(new), E4M3)
    t.store_(new, log2_scale)
    assert torch.equal(t.codes, cast_to_fp8_reference(new, torch.exp2(log2_scale), E4M3))
    assert float(t.scale_inv) == float(torch.exp2(-log2_scale))


class _Mesh:
    def __init__(self, n: int) -> None:
        self.n = n

    def size(self) -> int:
        return self.n


def test_pre_all_gather_pads_an_uneven_shard_from_fsdp2s_buffer():
    """FSDP2 shards 5 rows over 2 ranks as 3 + 2 and keeps rank 1's shard as rows 0..1 of a zeroed 3-row
    buffer: the gather input is that buffer (no copy), its padding row zero."""
    full = _fp8(_weight(rows=5))
    padded = full.new_zeros((3, 32))
    padded.narrow(0, 0, 2).copy_(full[3:5])
    shard = padded.narrow(0, 0, 2)
    (inputs,), scale_inv = shard.fsdp_pre_all_gather(_Mesh(2), torch.Size((5, 32)), (32, 1), None, None)
    assert inputs.dtype == torch.uint8 and inputs.shape == (3, 32)
    assert inputs.untyped_storage().data_ptr() == padded.codes.untyped_storage().data_ptr()
    assert torch.equal(inputs[:2], full.codes[3:5].view(torch.uint8)) and not inputs[2].any()
    assert torch.equal(scale_inv, full.scale_inv)
    alone = Fp8WeightTensor(full.codes[3:5].clone(), full.scale_inv.clone(), torch.bfloat16)
    (copied,), _ = alone.fsdp_pre_all_gather(_Mesh(2), torch.Size((5, 32)), (32, 1), None, None)
    assert copied.shape == (3, 32) and torch.equal(copied[:2], inputs[:2]) and not copied[2].any()


def test_post_all_gather_wraps_the_gathered_bytes_and_refreshes_the_scale():
    full = _fp8(_weight(rows=6))
    gathered = full.codes.view(torch.uint8).clone()
    weight, inner = full.fsdp_post_all_gather((gathered,), full.scale_inv, torch.bfloat16)
    assert isinstance(weight, Fp8WeightTensor) and inner == (gathered,)
    assert weight.codes.untyped_storage().data_ptr() == gathered.untyped_storage().data_ptr()
    assert torch.equal(weight.dequantize(), full.dequantize())
    assert full.fsdp_post_all_gather((gathered,), full.scale_inv * 2, torch.bfloat16, out=weight) is None
    assert float(weight.scale_inv) == 2 * float(full.scale_inv)


def test_fp8_linear_with_an_fp8_weight_tensor_matches_its_dequantized_weight():
    from fp8train import Fp8Config
    from fp8train.linear import Fp8Linear

    torch.manual_seed(0)
    ref = Fp8Linear(32, 16, bias=True, config=Fp8Config(backend="emulated"))
    fp8 = Fp8Linear(32, 16, bias=True, config=Fp8Config(backend="emulated"))
    stored = _fp8(ref.weight.detach().to(torch.float32))
    with torch.no_grad():
        ref.weight.copy_(stored.dequantize())
        fp8.bias.copy_(ref.bias)
    fp8.weight = torch.nn.Parameter(stored)
    x = torch.randn(4, 32)
    y_ref, y = ref(x), fp8(x)
    assert torch.equal(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert type(fp8.weight.grad) is torch.Tensor and fp8.weight.grad.dtype == torch.float32
    assert torch.equal(fp8.weight.grad, ref.weight.grad)
    assert torch.equal(fp8.bias.grad, ref.bias.grad)


def test_compiled_fp8_linear_reads_an_fp8_weight_tensor_as_eager_does():
    """torch.compile traces through the subclass (``__tensor_flatten__``) and ``fp8_operand``: the same
    output and gradients as eager, with no graph break (fullgraph)."""
    from fp8train import Fp8Config
    from fp8train.linear import Fp8Linear

    torch.manual_seed(0)
    layer = Fp8Linear(32, 16, bias=False, config=Fp8Config(backend="emulated"))
    layer.weight = torch.nn.Parameter(_fp8(layer.weight.detach()))
    x = torch.randn(4, 32)
    y = layer(x)
    y.square().sum().backward()
    grad = layer.weight.grad.clone()
    layer.weight.grad = None
    y_compiled = torch.compile(layer, fullgraph=True)(x)
    y_compiled.square().sum().backward()
    assert torch.equal(y_compiled, y)
    assert torch.equal(layer.weight.grad, grad)
