"""Optimizer state that must not be mistaken for another's, nor half-loaded:
torch.optim.AdamW refuses Fp8AdamW's scaled codes and Fp8AdamW refuses torch's moments; a rejected
state leaves Fp8AdamW exactly as it was; a ZeRO checkpoint of one inner optimizer is refused by
another, even when its manifest names no optimizer (rank 0 owned nothing).

Tolerance tier: bit-exact (uint8 views, dtype included) everywhere: the question is always "did
anything change" or "did the round trip lose anything"."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

from fp8train.comm import MANIFEST_NAME, ZeroConfig, ZeroOptimizer, load_zero_checkpoint, save_zero_checkpoint
from fp8train.optim import Fp8AdamW

from dist_utils import run_workers


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _trained() -> tuple[nn.Module, Fp8AdamW]:
    """Two steps of Fp8AdamW (default formats: e4m3 m, fp16 v, fp16 master) on a 2-layer MLP."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    opt = Fp8AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _assert_same(a: object, b: object, where: str = "") -> None:
    """Nested state_dicts equal bit for bit (tensors by dtype and bytes, everything else by ==)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(_bits(a), _bits(b)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), getattr(b, "keys", lambda: b)())
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# ---- neither optimizer loads the other's state ---------------------------------

def test_torch_adamw_refuses_fp8adamw_state_at_the_latest_at_its_first_step():
    # Today's failure: torch AdamW loads Fp8AdamW's state (same key names), casts the e4m3 / fp16
    # codes (moments times 2**log2_scale) to fp32 and steps with them as moments.
    model, fp8 = _trained()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 16)).pow(2).mean().backward()
    with pytest.raises((KeyError, ValueError), match="exp_avg"):
        adamw.load_state_dict(fp8.state_dict())
        adamw.step()


def test_fp8adamw_refuses_torch_adamw_state_naming_it():
    model, _ = _trained()
    adamw = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 16)).pow(2).mean().backward()
    adamw.step()
    fresh = Fp8AdamW(model.parameters())
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match="torch.optim.AdamW"):
        fresh.load_state_dict(adamw.state_dict())
    _assert_same(fresh.state_dict(), before)


def test_a_state_saved_under_the_old_key_names_still_loads_bit_exact():
    # Checkpoints written before the state keys were renamed held Fp8AdamW's codes under "exp_avg",
    # "exp_avg_sq" and "master"; the "fp8adamw" entry proves they came from Fp8AdamW.
    model, opt = _trained()
    current = opt.state_dict()
    legacy = copy.deepcopy(current)
    renames = {"exp_avg_scaled": "exp_avg", "exp_avg_sq_scaled": "exp_avg_sq", "master_scaled": "master"}
    legacy["state"] = {i: {renames.get(k, k): v for k, v in s.items()} for i, s in legacy["state"].items()}
    assert "exp_avg" in legacy["state"][0] and "exp_avg_scaled" not in legacy["state"][0]
    fresh = Fp8AdamW(model.parameters(), lr=1.0)
    fresh.load_state_dict(legacy)
    _assert_same(fresh.state_dict(), current)


# ---- validate before changing anything --------------------------------------------------

def _wrong_dtype(sd: dict) -> None:
    last = max(sd["state"])
    sd["state"][last]["exp_avg_scaled"] = sd["state"][last]["exp_avg_scaled"].float()


def _wrong_shape(sd: dict) -> None:
    last = max(sd["state"])
    sd["state"][last]["exp_avg_sq_scaled"] = sd["state"][last]["exp_avg_sq_scaled"][:1]


def _no_scale(sd: dict) -> None:
    del sd["state"][max(sd["state"])]["master_log2_scale"]


def _other_formats(sd: dict) -> None:
    sd["fp8adamw"]["formats"] = {**sd["fp8adamw"]["formats"], "exp_avg": "bf16"}


def _fewer_params(sd: dict) -> None:
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]


BAD_STATES = {  # only the LAST parameter is wrong: a loader that mutates as it goes has changed the others
    "wrong_dtype": (_wrong_dtype, "exp_avg_scaled"),
    "wrong_shape": (_wrong_shape, "exp_avg_sq_scaled"),
    "missing_scale": (_no_scale, "master_log2_scale"),
    "other_formats": (_other_formats, "formats"),
    "fewer_params": (_fewer_params, "parameter group"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_a_rejected_state_leaves_the_optimizer_exactly_as_before(case):
    model, source = _trained()
    model(torch.randn(4, 16)).pow(2).mean().backward()
    source.step()  # the state to load is one step ahead of the target's, with another lr and skip count
    source.step(found_inf=True)
    bad = copy.deepcopy(source.state_dict())
    for group in bad["param_groups"]:
        group["lr"] = 0.5
    mutate, match = BAD_STATES[case]
    mutate(bad)
    _, target = _trained()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(bad)
    _assert_same(target.state_dict(), before)
    assert target.skipped_steps == 0


# ---- the inner optimizer recorded in the checkpoint is checked -----------------------

def _worker_zero_formats(rank: int, world_size: int, directory: str) -> dict[str, str]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    zero = ZeroOptimizer(model.named_parameters(), lambda ps: Fp8AdamW(ps, lr=1e-2), config=ZeroConfig(stage=2))
    model(torch.randn(4, 16)).pow(2).mean().backward()
    zero.step()
    save_zero_checkpoint(zero, model, directory)
    out = {}

    def load_into_torch_adamw() -> str:
        other = ZeroOptimizer(model.named_parameters(), lambda ps: torch.optim.AdamW(ps), config=ZeroConfig(stage=2))
        try:
            load_zero_checkpoint(other, model, directory)
        except Exception as e:  # noqa: BLE001 - the message is what the test checks
            return f"{type(e).__name__}: {e}"
        return "no error"

    out["manifest"] = load_into_torch_adamw()
    # a manifest written by a rank 0 that owned no parameter names no optimizer: the shards still do
    if rank == 0:
        path = os.path.join(directory, MANIFEST_NAME)
        manifest = json.loads(open(path).read())
        manifest.update(optimizer=None, state_formats=None)
        open(path, "w").write(json.dumps(manifest))
    torch.distributed.barrier()
    out["no_optimizer_in_manifest"] = load_into_torch_adamw()
    return out


def test_a_zero_checkpoint_of_fp8adamw_is_refused_by_torch_adamw(tmp_path):
    results = run_workers(_worker_zero_formats, 2, str(tmp_path / "ckpt"), timeout_s=120)
    for case in ("manifest", "no_optimizer_in_manifest"):
        assert any("Fp8AdamW" in res[case] and "torch.optim.adamw.AdamW" in res[case] for res in results), results
    for rank, res in enumerate(results):
        for case, error in res.items():
            # the rank that found it names both classes; the other hears it failed there
            assert "Fp8AdamW" in error and "torch.optim.adamw.AdamW" in error or "failed on rank(s)" in error, \
                (rank, case, error)
