"""The ``fp8train`` command on bad configs and bad data: one line on stderr naming the key and what
is allowed, exit status 2, and nothing written (no run directory, no checkpoint, no cache file).

The cases run as real subprocesses (the CLI's exit code and output are the contract), all started
at once and awaited together to keep the suite short."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer_utils import assert_one_line_error, popen_cli

SMOKE = ["experiment=smoke", "train.steps=2", "logging.progress=false"]

# (id, extra args, files to create first {name: bytes}, text the error line must contain)
CASES = [
    ("unknown_group_option", ["precision=fp9"], {}, "precision='fp9' is not a config option; allowed values: bf16,"),
    ("unknown_option_in_sweep", ["-m", "model=gpt_tiny,gpt_huge"], {}, "model='gpt_huge' is not a config option"),
    ("unknown_key", ["optim.lrr=1e-3"], {}, "unknown config key 'optim.lrr'; allowed keys under optim: lr,"),
    ("unknown_nested_key", ["precision.fp8.recipee=delayed"], {},
     "unknown config key 'precision.fp8.recipee'; allowed keys under precision.fp8: recipe,"),
    ("wrong_type", ["train.steps=abc"], {}, "train.steps='abc' has the wrong type; expected integer"),
    ("bad_choice_value", ["precision.fp8.recipe=magic"], {}, "Fp8Config.recipe='magic' is not allowed"),
    ("bad_combination", ["precision=fp8_o3", "parallel=ddp"], {}, "needs parallel zero1, zero2 or fsdp2"),
    ("zero_without_fp8_comm", ["precision=fp32", "parallel=zero2"], {}, "needs precision.grad_comm='fp8'"),
    ("data_path_required", ["data=custom"], {}, "data.path"),
    ("data_path_missing", ["data=custom", "data.path=nope.txt"], {}, "data.path='nope.txt' does not exist"),
    ("data_file_empty", ["data=custom", "data.path=empty.txt"], {"empty.txt": b""}, "data.path='empty.txt' is empty"),
    ("data_too_short", ["data=custom", "data.path=short.txt"], {"short.txt": b"to be or not"},
     "fewer than one sequence of model.block_size + 1"),
    ("data_token_beyond_vocab", ["data=custom", "data.path=ids.bin", "data.bin_dtype=uint16"],
     {"ids.bin": (300).to_bytes(2, "little") * 5000}, "holds token id 300, which does not fit model.vocab_size=256"),
    ("resume_not_a_checkpoint", ["resume=not_a_dir"], {}, "resume='not_a_dir' is not a complete checkpoint"),
    ("bad_model_shape", ["model.n_head=3"], {}, "n_embd=128 must be divisible by n_head=3"),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Start every case in its own empty directory, then collect (returncode, stderr, leftovers)."""
    cache = tmp_path_factory.mktemp("cache")
    procs = {}
    for case_id, args, files, _ in CASES:
        cwd = tmp_path_factory.mktemp(case_id)
        for name, data in files.items():
            (cwd / name).write_bytes(data)
        procs[case_id] = (cwd, set(files), popen_cli([*SMOKE, *args], cwd, cache))
    results = {}
    for case_id, (cwd, created, proc) in procs.items():
        _, stderr = proc.communicate(timeout=300)
        leftovers = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.name not in created)
        results[case_id] = (proc.returncode, stderr, leftovers)
    results["_cache"] = sorted(p.name for p in Path(cache).rglob("*.bin"))
    return results


@pytest.mark.parametrize("message", [c[3] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_or_data_fails_in_one_line(outcomes, request, message):
    case_id = request.node.callspec.id
    returncode, stderr, leftovers = outcomes[case_id]
    assert_one_line_error(returncode, stderr, message)
    assert leftovers == [], leftovers  # no run directory, no half-written file


def test_strip_deepspeed_local_rank_argument():
    from fp8train.trainer.cli import _strip_launcher_args

    assert _strip_launcher_args(["--local_rank=3", "a=1", "--local-rank", "2", "b=2"]) == ["a=1", "b=2"]
