"""FP8 post-training quantization: quantize_for_inference, the metrics, and the fp8train-eval CLI.

One tiny fp32 model is trained once for the module, through the trainer, on a synthetic first-order
Markov text (32 byte values, peaked transitions: a 2-layer GPT reaches ~57 % top-1 accuracy, the
chain's optimum, in 60 steps; Shakespeare would still sit on its unigram plateau, where every
variant predicts the space and accuracy cannot move). n_embd=48 keeps every cast below
FAST_CAST_MIN_NUMEL, so the eager cast runs (bit-identical to the compiled one, tested in
test_cast.py) and no torch.compile start-up is paid.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
import torch
from torch import nn

from fp8train.trainer.bf16 import Bf16Linear, convert_to_bf16_emulated
from fp8train.config import Fp8Config
from fp8train.convert import convert_to_fp8
from fp8train.trainer.data import load_token_data, validation_windows
from fp8train.ptq.study import load_run, main, parse_biases, passing_interval
from fp8train.linear import Fp8Linear
from fp8train.models import GPT, GPTConfig
from fp8train.ptq import evaluate_lm, next_token_accuracy, quantize_for_inference, track_fp8_casts
from synthetic import MarkovTokens
from fp8train.trainer.run import train
from fp8train.trainer.build import build_model
from trainer_utils import tiny_config

N_STATES = 32  # Markov chain states = distinct bytes in the corpus; uniform guessing scores 1/32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a loaded 2-core box, 2 intra-op threads contending with other jobs made these small ops
    # 10-40x slower (measured); one thread keeps the module well under a minute.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ptq")
    chain = MarkovTokens(N_STATES, 4095, seed=0, concentration=3.0)
    x, y = chain.batch(64, torch.Generator().manual_seed(0))                 # (64, 4095) each
    tokens = torch.cat([x, y[:, -1:]], dim=1).reshape(-1) + ord("@")       # printable bytes @..._
    (root / "markov.txt").write_bytes(bytes(tokens.tolist()))
    cfg = tiny_config(root / "run", "precision=fp32", "train.steps=60", "model.n_embd=48",
                      f"data.path={root / 'markov.txt'}", "optim.lr=3e-3", "optim.min_lr=3e-4",
                      "checkpoint.every=0", "train.eval_every=0", "launcher.cpu_threads=1")
    assert train(cfg).step == 60
    return root / "run"


@pytest.fixture(scope="module")
def batches(run_dir):
    cfg = load_run(run_dir).cfg
    data = load_token_data(cfg.data, seq_len=cfg.block_size, vocab_size=cfg.vocab_size)
    return validation_windows(data.val, seq_len=cfg.block_size, batch_size=cfg.train.micro_batch_size, n_batches=8,
                              rank=0, world_size=1)                          # 8 x 4 x 64 = 2048 tokens


def _trained(run_dir: Path) -> nn.Module:
    run = load_run(run_dir)
    model = build_model(run.cfg.model, seed=0, device=torch.device("cpu"))
    model.load_state_dict(run.state_dict)
    return model


@pytest.fixture(scope="module")
def fp32_metrics(run_dir, batches):
    loss, acc = evaluate_lm(_trained(run_dir), batches)
    assert acc > 0.5, acc  # it learned the chain (optimum ~0.58), so quantization has room to hurt
    return loss, acc


def _ptq(run_dir, batches, recipe, bias=None):
    model = quantize_for_inference(_trained(run_dir), recipe=recipe, bias=bias)
    with track_fp8_casts(model) as tally:
        loss, acc = evaluate_lm(model, batches)
    return loss, acc, tally


def test_amax_matches_fp32(run_dir, batches, fp32_metrics):
    loss_hp, acc_hp = fp32_metrics
    loss, acc, tally = _ptq(run_dir, batches, "amax")
    # E4M3 keeps 3 mantissa bits (relative rounding error <= 2**-4 per element); with per-tensor
    # amax scaling nothing saturates and little flushes, and in 48-128-term dot products the errors
    # largely average out, so a top-1 prediction flips only where the two best logits nearly tie.
    # Measured: |d acc| ~ 0.05 % and |d loss| ~ 2e-4 nats; 99 % relative accuracy and 0.02 nats leave
    # ~20x margin for other torch builds / hosts, and still catch a broken scale (tests below: -98 %).
    assert acc >= 0.99 * acc_hp, (acc, acc_hp)
    assert abs(loss - loss_hp) <= 0.02, (loss, loss_hp)
    assert tally.input.saturated == 0 and tally.weight.saturated == 0  # amax maps each tensor below 448


def test_cscale_degrades_at_extreme_biases_and_matches_amax_between(run_dir, batches, fp32_metrics):
    _, acc_hp = fp32_metrics
    _, acc_amax, amax_tally = _ptq(run_dir, batches, "amax")
    # the largest constant bias that saturates nothing: AMAX's smallest per-tensor choice
    middle = int(min(amax_tally.input.log2_scale_min, amax_tally.weight.log2_scale_min))
    _, acc_mid, mid = _ptq(run_dir, batches, "cscale", middle)
    assert mid.input.saturated == 0 and mid.weight.saturated == 0
    assert acc_mid >= 0.99 * acc_amax, (middle, acc_mid, acc_amax)      # same tolerance as AMAX vs fp32
    # bias +20: |x| * 2**20 > 448 for |x| > 2**-11.2, so nearly every activation and weight clamps
    _, acc_high, high = _ptq(run_dir, batches, "cscale", 20)
    assert high.input.saturated_fraction > 0.9 and high.weight.saturated_fraction > 0.9
    # bias -12: |x| * 2**-12 < 2**-10 for |x| < 4, so every weight and most activations flush to 0
    _, acc_low, low = _ptq(run_dir, batches, "cscale", -12)
    assert low.weight.underflowed_fraction == 1.0 and low.input.underflowed_fraction > 0.5
    assert low.input.saturated == 0 and high.input.underflowed == 0
    # with the linear layers wiped out the model keeps only embeddings + head: near chance (1/32)
    for acc in (acc_high, acc_low):
        assert acc < 2 / N_STATES < 0.25 * acc_hp, (acc_high, acc_low, acc_hp)


def test_output_head_stays_high_precision_unless_asked(run_dir):
    kept = quantize_for_inference(_trained(run_dir), recipe="amax")
    assert type(kept.lm_head) is nn.Linear and isinstance(kept.h[0].mlp.c_fc, Fp8Linear)
    assert not kept.training
    quantized = quantize_for_inference(_trained(run_dir), recipe="cscale", bias=4, skip_output_head=False)
    assert isinstance(quantized.lm_head, Fp8Linear) and quantized.lm_head.weight is quantized.wte.weight


def test_bf16_model_converts_through_plain_linear():
    model = convert_to_bf16_emulated(GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)))
    weight = model.h[0].attn.c_attn.weight
    quantize_for_inference(model, recipe="amax")
    assert type(model.h[0].attn.c_attn) is Fp8Linear and model.h[0].attn.c_attn.weight is weight  # shared, no copy
    assert type(model.lm_head) is Bf16Linear  # the head keeps its trained precision
    idx = torch.randint(64, (2, 16))
    assert torch.isfinite(model(idx, idx)[1])


_TINY = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)


@pytest.mark.parametrize(("kwargs", "match"), [
    pytest.param(dict(recipe="delayed"), r"recipe='delayed' is not allowed; allowed values: 'amax', 'cscale'",
                 id="recipe"),
    pytest.param(dict(recipe="amax", bias=3), r"bias=3 is not allowed with recipe='amax'.*bias=None", id="amax-bias"),
    pytest.param(dict(recipe="cscale"), r"bias=None is not allowed with recipe='cscale'; allowed: an int in "
                 r"\[-126, 126\]", id="cscale-no-bias"),
    pytest.param(dict(recipe="cscale", bias=127), r"bias=127 .*\[-126, 126\]", id="cscale-too-high"),
    pytest.param(dict(recipe="cscale", bias=-127), r"bias=-127 .*\[-126, 126\]", id="cscale-too-low"),
    pytest.param(dict(recipe="cscale", bias=2.0), r"bias=2.0 .*an int", id="cscale-float"),
    pytest.param(dict(recipe="cscale", bias=True), r"bias=True .*an int", id="cscale-bool"),
])
def test_quantize_for_inference_rejects_bad_arguments(kwargs, match):
    model = GPT(_TINY)
    with pytest.raises(ValueError, match=match) as err:
        quantize_for_inference(model, **kwargs)
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())  # checked before anything changes


def test_quantize_for_inference_refuses_an_fp8_model():
    model = convert_to_fp8(GPT(_TINY), config=Fp8Config())
    with pytest.raises(ValueError, match=r"already has 4 Fp8Linear layers .*evaluate it as trained"):
        quantize_for_inference(model, recipe="amax")


def test_next_token_accuracy_counts_top1_hits():
    logits = torch.tensor([[[0.1, 2.0, 0.3], [5.0, 1.0, 1.0]]])              # (1, 2, 3)
    assert next_token_accuracy(logits, torch.tensor([[1, 2]])) == 0.5
    assert next_token_accuracy(logits, torch.tensor([[1, 0]])) == 1.0


@pytest.mark.parametrize(("text", "expected"), [
    ("-4:12", list(range(-4, 13))), ("0:8:4", [0, 4, 8]), ("3,-1,3", [-1, 3]), ("5", [5]), ("-126:-125", [-126, -125]),
])
def test_parse_biases(text, expected):
    assert parse_biases(text) == expected


@pytest.mark.parametrize(("passed", "expected"), [
    ([False, True, True, False, True], (1, 2)), ([False] * 5, None), ([True] * 5, (0, 4)),
    ([True, False, True, True, True], (2, 4)), ([True, False, True, False, False], (0, 0)),
])
def test_passing_interval_is_the_longest_run(passed, expected):
    biases = [0, 1, 2, 3, 4]
    assert passing_interval(biases, passed) == expected


def test_cli_end_to_end(run_dir, tmp_path, capsys, fp32_metrics):
    out = tmp_path / "out"
    # "-12,..." starts with '-': argparse alone would take it for an option; biases 0 and 4 sit well
    # inside the passing range (-4..8 on this model), -12 and 20 far outside (accuracy ~1 %)
    main([str(run_dir), "--biases", "-12,0,4,20", "--batches", "8", "--out", str(out), "--no-progress"])
    stdout = capsys.readouterr().out
    assert "FP8-AMAX" in stdout and "FP8-CSCALE biases with accuracy >= 99.5 % of fp32 as trained: [+0, +4]" in stdout
    study = json.loads((out / "ptq.json").read_text())
    keys = {"reference", "amax", "cscale", "passing_biases", "interval", "threshold", "tokens", "checkpoint", "step"}
    assert keys <= set(study)
    assert [r["bias"] for r in study["cscale"]] == [-12, 0, 4, 20]
    assert study["reference"]["accuracy"] == fp32_metrics[1]  # the same model and batches: exactly
    assert study["interval"] == [0, 4] and study["passing_biases"] == [0, 4]
    png = (out / "ptq_accuracy_vs_bias.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert sorted(p.name for p in out.iterdir()) == ["ptq.json", "ptq_accuracy_vs_bias.png"]  # no temp files left


def _bad_runs(root: Path, run_dir: Path) -> dict[str, Path]:
    (root / "empty").mkdir()
    (root / "untrained").mkdir()
    (root / "untrained" / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    return {"missing": root / "nope", "empty": root / "empty", "untrained": root / "untrained", "ok": run_dir}


@pytest.mark.parametrize(("which", "extra", "message"), [
    ("missing", [], "is not a run directory (no config.yaml)"),
    ("empty", [], "is not a run directory (no config.yaml)"),
    ("untrained", [], "holds no complete checkpoint"),
    ("ok", ["--checkpoint", "/nonexistent/step_1"], "holds no model.pt"),
    ("ok", ["--biases", "a:b"], "--biases='a:b' is malformed"),
    ("ok", ["--biases", "5:1"], "--biases='5:1' is malformed"),
    ("ok", ["--biases", "0:4:0"], "--biases='0:4:0' is malformed"),
    ("ok", ["--biases", "0:200"], "--biases='0:200' is out of range"),
    ("ok", ["--batches", "0"], "--batches=0 is out of range"),
    ("ok", ["--batches", "100000"], "--batches=100000 needs"),
    ("ok", ["--device", "tpu"], "--device='tpu'"),
    ("ok", ["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_cli_errors_are_one_line_and_write_nothing(run_dir, tmp_path, capsys, which, extra, message):
    target = _bad_runs(tmp_path, run_dir)[which]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([str(target), "--out", str(out), "--no-progress", *extra])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fp8train-eval: error: ") and message in lines[0], captured.err
    assert not out.exists() and not (target / "ptq").exists()


def test_cli_on_an_fp8_trained_run_evaluates_it_as_trained(run_dir, tmp_path, capsys):
    # An FP8 run's checkpoint without training one: the fp32 run's weights in Fp8Linear layers, with
    # scaling state set by one forward (as training leaves it), under a config that says gemm=fp8.
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    raw["precision"].update(name="fp8_o1", gemm="fp8")
    fp8_run = tmp_path / "fp8_run"
    ckpt = fp8_run / "checkpoints" / "step_00000007"
    ckpt.mkdir(parents=True)
    (fp8_run / "config.yaml").write_text(yaml.safe_dump(raw))
    (ckpt / "trainer.json").write_text(json.dumps({"step": 7}))
    model = convert_to_fp8(_trained(run_dir), config=Fp8Config(recipe="current"))
    model(torch.randint(N_STATES, (2, 8)) + ord("@"))
    state = model.state_dict()
    assert any(k.endswith("input_scaling.log2_scale") for k in state)
    torch.save(state, ckpt / "model.pt")

    main([str(fp8_run), "--checkpoint", str(ckpt / "model.pt"), "--biases", "4", "--batches", "2", "--no-progress"])
    assert "the run trained in FP8 (fp8_o1)" in capsys.readouterr().out
    study = json.loads((fp8_run / "ptq" / "ptq.json").read_text())
    assert study["reference"]["variant"] == "fp8_o1 as trained (FP8 current)" and study["step"] == 7
    # as trained = the same weights with the same just-in-time recipe as FP8-AMAX: identical numbers
    ref, amax = study["reference"], study["amax"]
    assert (ref["loss"], ref["accuracy"]) == (amax["loss"], amax["accuracy"])


def test_track_fp8_casts_leaves_monitor_counters_and_flags_as_they_were():
    model = quantize_for_inference(GPT(_TINY), recipe="amax")
    idx = torch.randint(64, (2, 16))
    watched = model.h[0].mlp.c_fc.input_scaling       # a monitor samples this one
    watched.sample_stats = True
    model(idx)
    seen = int(watched.stat_numel)
    with track_fp8_casts(model) as tally:
        model(idx)
    assert watched.sample_stats and int(watched.stat_numel) == 2 * seen   # kept counting, not reset
    assert not model.h[0].mlp.c_fc.weight_scaling.sample_stats           # switched back off
    # (B*T) x in_features of c_attn, attn.c_proj, c_fc, mlp.c_proj; their weights: 96x32, 32x32, 128x32, 32x128
    assert tally.input.numel == 2 * 16 * (32 + 32 + 32 + 128)
    assert tally.weight.numel == 96 * 32 + 32 * 32 + 2 * 128 * 32
    with pytest.raises(ValueError, match="recipe='delayed'"):
        with track_fp8_casts(convert_to_fp8(GPT(_TINY), config=Fp8Config(recipe="delayed"))):
            pass
