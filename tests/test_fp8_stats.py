"""FP8 scale-dynamics metrics (fp8train.trainer.fp8_stats) and their plots (fp8train.trainer.plots)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from fp8train import Fp8Config, convert_to_fp8
from fp8train.trainer.plots import write_run_plots
from fp8train.trainer.fp8_stats import arm_cast_stats, bias_histograms, cast_metrics, layer_key, wgrad_metrics
from fp8train.trainer.run import train
from trainer_utils import tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(32, 64)
        self.mlp.c_proj = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.c_proj(torch.relu(self.mlp.c_fc(x)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.h = nn.ModuleList([_Block(), _Block()])
    model.forward = lambda x: model.h[1](model.h[0](x))  # type: ignore[method-assign]
    return convert_to_fp8(model, config=Fp8Config(recipe="current"), skip_output_head=False)


LAYER_KEYS = [
    ("h.3.attn.c_attn", ("qkv", "L3")), ("h.0.mlp.c_proj", ("ffn_out", "L0")),
    ("layers.11.attn.wq", ("q", "L11")), ("layers.2.mlp.w1", ("ffn_gate", "L2")),
    ("model.layers.5.self_attn.o_proj", ("attn_out", "L5")), ("model.layers.0.mlp.down_proj", ("ffn_out", "L0")),
    ("encoder.proj", ("encoder_proj", "-")), ("blocks.7.custom.lin", ("custom_lin", "L7")),
]


@pytest.mark.parametrize("fqn, expected", LAYER_KEYS, ids=[k for k, _ in LAYER_KEYS])
def test_layer_key_names_types_and_layers(fqn, expected):
    assert layer_key(fqn) == expected


@pytest.mark.parametrize("k", [-3, 1, 4])
def test_input_scaled_by_2_pow_k_shifts_its_bias_by_minus_k(k):
    model = _model()
    x = torch.randn(16, 32)
    model(x)
    before = cast_metrics(model)
    model(x * 2.0**k)
    after = cast_metrics(model)
    key = "fp8/ffn_in/input/scaling_bias/L0"
    assert after[key] == before[key] - k
    assert after["fp8/ffn_in/input/amax/L0"] == pytest.approx(before["fp8/ffn_in/input/amax/L0"] * 2.0**k)
    assert after["fp8/ffn_in/weight/scaling_bias/L0"] == before["fp8/ffn_in/weight/scaling_bias/L0"]


def test_saturation_and_underflow_fractions_are_counted_only_when_armed():
    model = _model()
    x = torch.randn(64, 32)
    model(x)
    assert not any("saturated_frac" in k for k in cast_metrics(model))  # not armed: not counted
    arm_cast_stats(model, True)
    y = model(x)
    y.sum().backward()
    arm_cast_stats(model, False)
    metrics = cast_metrics(model)
    # just-in-time amax scaling: nothing saturates; random normal inputs: almost nothing underflows
    assert metrics["fp8/ffn_in/input/saturated_frac/L0"] == 0.0
    assert 0.0 <= metrics["fp8/ffn_in/input/underflow_frac/L0"] < 1e-3
    assert "fp8/ffn_out/grad_output/underflow_frac/L1" in metrics  # backward casts are counted too
    # a tiny value next to a huge one underflows at the scale the huge one sets
    model2 = _model()
    arm_cast_stats(model2, True)
    spread = torch.zeros(4, 32)
    spread[0, 0], spread[1:, :] = 1e4, 1e-6
    model2(spread)
    assert cast_metrics(model2)["fp8/ffn_in/input/underflow_frac/L0"] == pytest.approx(96 / 97)


def test_wgrad_metrics_and_histograms():
    model = _model()
    model(torch.randn(8, 32)).sum().backward()
    # the comm's biases by parameter name (tests/test_wgrad_metrics.py checks them against the wire);
    # biases of other parameters are not wgrad metrics
    used = {f"h.{i}.mlp.{fc}.weight": float(10 * i + j) for i in range(2) for j, fc in enumerate(("c_fc", "c_proj"))}
    wgrad = wgrad_metrics(model, {**used, "h.0.mlp.c_fc.bias": 3.0})
    assert {k.split("/")[1] for k in wgrad} == {"ffn_in", "ffn_out"} and len(wgrad) == 4
    assert wgrad["fp8/ffn_in/wgrad/scaling_bias/L0"] == 0.0 and wgrad["fp8/ffn_out/wgrad/scaling_bias/L1"] == 11.0
    hist = bias_histograms({**wgrad, **cast_metrics(model)})
    assert len(hist["fp8_hist/ffn_in/wgrad"]) == 2 and len(hist["fp8_hist/ffn_out/input"]) == 2


def test_run_writes_plots_and_the_plot_command_works(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, "train.steps=10", "monitor.every=2", "checkpoint.every=0"))
    plots = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert plots == ["loss.png", "scaling_bias_by_layer.png", "scaling_bias_over_training.png"]
    for name in plots:
        data = (run_dir / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    out = tmp_path / "compare"
    proc = subprocess.run([sys.executable, "-m", "fp8train.trainer.plots", str(run_dir), str(run_dir),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "loss.png").read_bytes().startswith(PNG_MAGIC)
    bad = subprocess.run([sys.executable, "-m", "fp8train.trainer.plots", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "has no metrics.jsonl" in bad.stderr
    assert write_run_plots([run_dir], tmp_path / "again")  # the API returns what it wrote
