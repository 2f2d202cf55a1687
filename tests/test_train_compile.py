"""``train.compile=true``: the trainer compiles each transformer block in place (fullgraph), trains
like eager, keeps its checkpoint keys and resumes bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fp8train.errors import ConfigError
from fp8train.models import GPT, GPTConfig, Llama, LlamaConfig
from fp8train.trainer.checkpoint import latest_checkpoint
from fp8train.trainer.compile import compile_blocks, transformer_blocks
from fp8train.trainer.run import train
from fp8train.trainer.run_log import read_metrics
from trainer_utils import assert_one_line_error, metrics_without_timing, run_cli, tiny_config


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_the_blocks_are_the_entries_of_the_outermost_module_lists() -> None:
    gpt = GPT(GPTConfig(n_layer=3, n_embd=32, n_head=2, block_size=16))
    llama = Llama(LlamaConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_size=16))
    assert transformer_blocks(gpt) == list(gpt.h)
    assert transformer_blocks(llama) == list(llama.layers)
    nested = nn.Sequential(nn.ModuleList([nn.ModuleList([nn.Linear(2, 2)]), nn.Linear(2, 2)]))
    assert transformer_blocks(nested) == list(nested[0])  # the inner list is part of a block


def test_compiling_in_place_keeps_the_module_tree_and_state_dict_keys() -> None:
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16))
    keys = list(model.state_dict())
    assert compile_blocks(model) == 2
    assert list(model.state_dict()) == keys and isinstance(model.h[0], nn.Module)
    assert all(block._compiled_call_impl is not None for block in model.h)


def test_a_model_without_blocks_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train.compile=true .* allowed: train.compile=false"):
        compile_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_a_non_boolean_compile_is_a_one_line_error(tmp_path, cache_dir) -> None:
    proc = run_cli(["experiment=smoke", "train.compile=yes", f"data.cache_dir={cache_dir}",
                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, cache_dir)
    assert_one_line_error(proc.returncode, proc.stderr, "train.compile='yes' has the wrong type; expected true/false")
    assert not (tmp_path / "run").exists()


def _losses(run_dir) -> torch.Tensor:
    return torch.tensor([r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r])


def test_a_compiled_fp8_o2_run_trains_like_eager_and_resumes_bit_for_bit(tmp_path, cache_dir, capsys) -> None:
    common = ("precision=fp8_o2", "logging.log_every=1", f"data.cache_dir={cache_dir}", "train.steps=8",
              "checkpoint.every=4", "train.eval_every=4", "monitor.every=2")
    eager = train(tiny_config(tmp_path / "eager", *common))
    straight = train(tiny_config(tmp_path / "straight", *common, "train.compile=true"))
    assert straight.step == 8 and straight.skipped_steps == 0
    assert "| 2 blocks compiled" in capsys.readouterr().out
    # FP8 rounding amplifies fp32-rounding differences of fused kernels, step by step: close, not equal
    torch.testing.assert_close(_losses(tmp_path / "straight"), _losses(tmp_path / "eager"), rtol=5e-4, atol=0)
    assert abs(straight.val_loss - eager.val_loss) < 5e-4 * eager.val_loss

    first = train(tiny_config(tmp_path / "resumed", *common, "train.compile=true", "train.stop_after=4"))
    assert first.step == 4 and latest_checkpoint(tmp_path / "resumed").name == "step_00000004"
    second = train(tiny_config(tmp_path / "resumed", *common, "train.compile=true"))
    assert second.step == 8
    a, b = metrics_without_timing(tmp_path / "straight"), metrics_without_timing(tmp_path / "resumed")
    assert len(a) == len(b) > 8
    assert a == b  # every loss, grad norm, scaling bias and val loss, exactly


def test_an_activation_gradient_fault_inside_a_compiled_block_is_refused(tmp_path) -> None:
    """Compiled code does not see a hook added after compilation (dynamo does not guard on module
    hooks): the fault would silently not happen, so the combination is a config error."""
    with pytest.raises(ConfigError, match="faults.nonfinite_where='activation_grad' .* allowed with "
                                          "train.compile=true: faults.nonfinite_where=loss"):
        tiny_config(tmp_path, "train.compile=true", "faults.nonfinite_step=3", "faults.nonfinite_where=activation_grad")
    assert tiny_config(tmp_path, "train.compile=true", "faults.nonfinite_step=3").train.compile


def test_a_loss_fault_in_a_compiled_run_is_skipped(tmp_path, cache_dir) -> None:
    result = train(tiny_config(tmp_path / "run", "precision=fp8_o2", "train.steps=4", "train.compile=true",
                               "faults.nonfinite_step=3", f"data.cache_dir={cache_dir}"))
    assert (result.step, result.skipped_steps) == (4, 1)


@pytest.mark.reliability  # ~25 s (make test-reliability; CI runs it)
def test_torchrun_two_processes_with_compiled_blocks_and_zero2(tmp_path, cache_dir) -> None:
    """Compiled blocks under ZeRO-2 with FP8 weights (fp8_o3): the strategy's hooks and gathers
    stay outside the compiled graphs; every rank trains and checkpoints."""
    run_dir = tmp_path / "run"
    proc = run_cli(["experiment=smoke", "precision=fp8_o3", "train.compile=true", "train.steps=4",
                    "checkpoint.every=4", "train.eval_every=4", "logging.progress=false", f"data.cache_dir={cache_dir}",
                    f"hydra.run.dir={run_dir}"], tmp_path, cache_dir, torchrun_nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zero2 on 2 x cpu" in proc.stdout and "| 2 blocks compiled" in proc.stdout
    losses = [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert {"optim-rank0-of-2.pt", "optim-rank1-of-2.pt"} <= {p.name for p in (run_dir / "checkpoints/step_00000004").iterdir()}
