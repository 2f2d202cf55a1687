"""FP8 primary weights in the layer (``Fp8Linear(fp8_weight=True)``): storage, numerics against the
high-precision layer, gradients, state_dict compatibility in both directions, conversion checks."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from fp8train import Fp8Config, Fp8Linear, convert_to_fp8
from fp8train.formats import E4M3


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.Linear(32, 16))


def _pair(config: Fp8Config | None = None) -> tuple[nn.Sequential, nn.Sequential]:
    """The same model converted with high-precision weights and with FP8 ones."""
    hp = convert_to_fp8(_mlp(), config=config)
    fp8 = convert_to_fp8(_mlp(), config=config, fp8_weights=True)
    return hp, fp8


@pytest.mark.parametrize("backend", ["emulated", "scaled_mm"])
@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_outputs_and_gradients_are_bit_identical_to_the_high_precision_layer(backend: str, recipe: str) -> None:
    # current: the stored codes are the cast the forward would apply; delayed: the first cast of a
    # weight uses its own amax in both, and the weight does not change between these two forwards
    hp, fp8 = _pair(Fp8Config(backend=backend, recipe=recipe))
    for step in range(2):  # two micro-steps: the gradient accumulates in the Parameter
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(step))
        y_hp, y_fp8 = hp(x), fp8(x)
        assert torch.equal(y_hp, y_fp8)
        y_hp.square().sum().backward()
        y_fp8.square().sum().backward()
    for (name, p_hp), p_fp8 in zip(hp.named_parameters(), fp8.parameters()):
        assert p_fp8.grad.dtype == torch.float32 and p_fp8.grad.is_contiguous(), name
        assert torch.equal(p_hp.grad, p_fp8.grad), name


def test_released_weight_keeps_its_shape_and_gradient_over_one_element_of_storage() -> None:
    _, model = _pair()
    layer: Fp8Linear = model[0]
    weight = layer.weight
    stored_before = layer.dequantized_weight()
    layer.release_high_precision_()
    assert layer.weight is weight and weight.shape == (64, 32) and not layer.holds_high_precision_weight
    assert weight.untyped_storage().nbytes() == weight.element_size()
    assert layer.weight_codes.dtype == E4M3.dtype and layer.weight_codes.untyped_storage().nbytes() == 64 * 32
    assert torch.equal(layer.dequantized_weight(), stored_before)  # the forward never read the Parameter
    model(torch.randn(4, 32)).sum().backward()
    assert weight.grad.shape == (64, 32) and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_the_state_dict_holds_codes_not_the_parameter_and_round_trips_bit_exact() -> None:
    _, model = _pair()
    model[0].release_high_precision_()
    state = model.state_dict()
    assert "0.weight" not in state and "3.weight" in state  # 3 is the output head: not converted
    assert state["0.weight_codes"].dtype == E4M3.dtype and state["0.weight_scale_inv"].shape == ()
    _, other = _pair()
    other[0].release_high_precision_()
    with torch.no_grad():
        other[0].weight_codes.zero_()
    other.load_state_dict(state)  # strict
    x = torch.randn(4, 32)
    assert torch.equal(model(x), other(x))


def test_a_high_precision_state_dict_loads_into_fp8_weights_as_their_cast() -> None:
    plain = _mlp(seed=1)
    state = plain.state_dict()  # pre-conversion keys: no scaling state, no codes
    _, model = _pair()
    model.load_state_dict(state)
    reference = convert_to_fp8(_mlp(seed=1))  # high-precision weights from the same values
    x = torch.randn(4, 32)
    assert torch.equal(model(x), reference(x))
    # the Parameter still held values, so it took the loaded ones (an optimizer's master starts there)
    assert torch.equal(model[0].weight, plain[0].weight)
    # once released, only the codes change
    model[2].release_high_precision_()
    model.load_state_dict(state)
    assert torch.equal(model(x), reference(x))


def test_an_fp8_weight_state_dict_loads_into_high_precision_layers_as_the_weights_it_computed_with() -> None:
    _, model = _pair()
    hp = convert_to_fp8(_mlp(seed=5))
    hp.load_state_dict(model.state_dict())
    for i in (0, 2):
        assert torch.equal(hp[i].weight, model[i].dequantized_weight(torch.float32))
    x = torch.randn(4, 32)
    assert torch.equal(hp(x), model(x))


def test_set_weight_keeps_the_previous_scale_on_a_nonfinite_amax() -> None:
    _, model = _pair()
    layer: Fp8Linear = model[0]
    scale_inv = layer.weight_scale_inv.clone()
    bad = torch.randn(64, 32)
    bad[3, 4] = float("inf")
    layer.set_weight_(bad)
    assert torch.equal(layer.weight_scale_inv, scale_inv)
    assert int(layer.weight_scaling.n_amax_nonfinite) == 1


def test_set_fp8_weight_copies_codes_and_moves_the_monitored_bias() -> None:
    _, model = _pair()
    layer: Fp8Linear = model[0]
    codes = torch.randn(64, 32).to(E4M3.dtype)
    layer.set_fp8_weight_(codes.view(-1), torch.tensor(2.0**-5))
    assert torch.equal(layer.weight_codes.view(torch.uint8), codes.view(torch.uint8))
    assert float(layer.weight_scaling.log2_scale) == 5.0
    assert float(layer.weight_scaling.amax_history[0]) == float(codes.to(torch.float32).abs().max()) * 2.0**-5
    assert int(layer.weight_scaling.n_casts) == 2  # the cast at conversion, then this one


def test_fp8_weight_calls_on_a_high_precision_layer_are_refused() -> None:
    layer = Fp8Linear(32, 16)
    with pytest.raises(RuntimeError, match="fp8_weight=True"):
        layer.release_high_precision_()
    with pytest.raises(ValueError, match="allowed values: True, False"):
        Fp8Linear(32, 16, fp8_weight="yes")


def test_conversion_refuses_a_tied_weight() -> None:
    model = _mlp()
    model.append(nn.Linear(32, 64))
    model[4].weight = model[0].weight  # tied: another module reads it
    with pytest.raises(ValueError, match="is tied to"):
        convert_to_fp8(model, fp8_weights=True, skip_output_head=False)
