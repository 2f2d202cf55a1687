"""bench/comm_model.py: the communication model's fit recovers known coefficients from synthetic runs, keeps
them non-negative, reports its error honestly; the projection's collectives count bytes and hops as its
docstring says; docs/scaling.md holds the script's current output (its numbers are not typed by hand)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)  # comm_model puts bench/ on sys.path for _scaling and _timing
    finally:  # ... and must not leave it there: bench/comm.py would shadow the top-level name "comm"
        sys.path[:] = saved
    return module


comm_model = _load("comm_model")
scaling = sys.modules["_scaling"]

# ground truth for the synthetic runs: (latency s per ring step, fraction of link rate, s per element)
TRUTH = {("reduce_scatter", "fp8"): (3e-4, 0.93, 9e-9), ("all_reduce", "fp32"): (1e-3, 0.88, 2e-9)}


def _runs(truth=TRUTH, cpus: int = 2) -> list[dict]:
    """Runs as bench/comm.py --json writes them, their seconds from the model's formula written out here."""
    runs = []
    for (collective, method), worlds, rate, elements in itertools.product(truth, (2, 4), (1.0, 5.0),
                                                                           (2**20, 2**22, 2**24)):
        alpha, eta, gamma = truth[(collective, method)]
        steps = (2 if collective == "all_reduce" else 1) * (worlds - 1)
        wire_bytes = 3 * elements * (worlds - 1) / worlds
        seconds = alpha * steps + wire_bytes * 8 / (eta * rate * 1e9) + gamma * elements * max(1, worlds / cpus)
        runs.append({"collective": collective, "method": method, "world": worlds, "nodes": worlds, "cpus": cpus,
                     "link_gbit": rate, "elements": elements, "bytes_sent": wire_bytes, "wire_bytes": wire_bytes,
                     "seconds": seconds})
    return runs


def test_fit_recovers_the_coefficients_of_exact_synthetic_runs():
    fits = comm_model.fit(_runs())
    assert set(fits) == set(TRUTH)
    for key, (alpha, eta, gamma) in TRUTH.items():
        f = fits[key]
        # exact data and a well-posed 3-unknown least squares: recovered to float64 round-off
        np.testing.assert_allclose([f.latency_s, f.efficiency, f.serial_s_per_element], [alpha, eta, gamma], rtol=1e-6)
        assert f.overlapped_s_per_element == 0.0
    assert max(abs(e) for _, _, e in comm_model.errors(_runs(), fits)) < 1e-6


def test_loopback_runs_are_not_fitted():
    loopback = [{**r, "link_gbit": None} for r in _runs()]
    assert comm_model.fit(loopback) == {}
    assert comm_model.errors(loopback, comm_model.fit(_runs())) == []


def test_coefficients_stay_non_negative_where_plain_least_squares_goes_negative():
    runs = _runs({("reduce_scatter", "fp8"): (0.0, 0.9, 5e-9)})
    for r in runs:  # 4-node runs 10 % faster than the model: plain least squares answers with a negative latency
        r["seconds"] *= 0.9 if r["world"] == 4 else 1.0
    t = np.array([r["seconds"] for r in runs])
    plain = np.linalg.lstsq(np.array([comm_model.features(r) for r in runs]) / t[:, None], np.ones(len(runs)),
                            rcond=None)[0]
    assert plain[0] < 0  # the case this test is about
    f = comm_model.fit(runs)[("reduce_scatter", "fp8")]
    assert f.latency_s >= 0 and 0 < f.efficiency <= 1 and f.serial_s_per_element >= 0


def test_fit_recovers_a_pipelined_collective():
    """Local work overlapped with the wire over n pieces: t = alpha hops + max(W, G) + min(W, G) / n + gamma_s
    work, W = wire / eta, G = gamma_o work; n from the FP8 all-reduce's pieces per region (1 or 2 here)."""
    runs = _runs({("all_reduce", "fp8"): (2e-4, 0.95, 0.0)})
    assert {comm_model.pieces(r) for r in runs} == {1.0, 2.0}, "runs with and without overlap"
    for r in runs:
        steps, wire_s, work = comm_model.features(r)
        w, g = wire_s / 0.95, 5e-9 * work
        r["seconds"] = 2e-4 * steps + max(w, g) + min(w, g) / comm_model.pieces(r) + 1e-9 * work
    f = comm_model.fit(runs)[("all_reduce", "fp8")]
    # exact data: each run on its side of the max() after the refits, so round-off again
    np.testing.assert_allclose([f.latency_s, f.efficiency, f.overlapped_s_per_element, f.serial_s_per_element],
                               [2e-4, 0.95, 5e-9, 1e-9], rtol=1e-6)
    assert max(abs(e) for _, _, e in comm_model.errors(runs, {("all_reduce", "fp8"): f})) < 1e-6


def test_fits_use_the_fastest_call_when_recorded():
    runs = _runs()
    for r in runs:
        r["seconds_min"], r["seconds"] = r["seconds"], 1.5 * r["seconds"]  # a noisy median
    assert max(abs(e) for _, _, e in comm_model.errors(runs, comm_model.fit(runs))) < 1e-6


def test_break_even_rate_is_where_the_fitted_models_cross():
    runs = _runs({("reduce_scatter", "fp8"): (0.0, 1.0, 8e-9), ("reduce_scatter", "bf16"): (0.0, 1.0, 4e-9)})
    for r in runs:  # bf16 sends twice fp8's bytes
        if r["method"] == "bf16":
            r["wire_bytes"] *= 2
            r["seconds"] += r["wire_bytes"] / 2 * 8 / (r["link_gbit"] * 1e9)
    fits = comm_model.fit(runs)
    # per element, 2 nodes: fp8 saves (N-1)/N * 3 B = 1.5 B = 12 bit of wire; it costs 4 ns more work
    assert comm_model.break_even_gbit(fits, runs, "reduce_scatter", "bf16", 2) == pytest.approx(12 / 4e-9 / 1e9,
                                                                                              rel=1e-6)


def test_efficiency_never_exceeds_the_link_rate():
    runs = _runs({("all_reduce", "fp8"): (1e-4, 0.9, 5e-9)})
    for r in runs:  # a pipelined collective overlapping its compute with the wire: faster than the sum
        r["seconds"] *= 0.6
    assert comm_model.fit(runs)[("all_reduce", "fp8")].efficiency <= 1.0


def test_errors_are_signed_relative_to_the_measurement():
    run = _runs()[0]
    x = comm_model.features(run)
    f = comm_model.Fit(collective=run["collective"], method=run["method"], latency_s=0.0, efficiency=0.5,
                       overlapped_s_per_element=0.0, serial_s_per_element=(2 * run["seconds"] - 2 * x[1]) / x[2])
    (_, predicted, error), = comm_model.errors([run], {(run["collective"], run["method"]): f})
    assert predicted == pytest.approx(2 * run["seconds"], rel=1e-12)
    assert error == pytest.approx(100.0, rel=1e-9)


def test_reproducibility_report_compares_passes_with_each_other_and_with_the_models():
    first = _runs()
    second = [{**r, "seconds": r["seconds"] * (1.3 if i == 0 else 0.95)} for i, r in enumerate(first)]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:]
            for line in comm_model.reproducibility_report(first, second).splitlines()[2:]}
    # pass to pass: one run 30 % slower (outside 20 %), the rest 5 % faster; median -5 %, largest 30
    assert rows["second pass vs first pass's measured time"] == ["24", "23", "-5.0", "30.0 |"]
    # the first pass is the model's exact formula: its own fit predicts it to round-off
    assert rows["first pass vs model fitted to it"][:2] == ["24", "24"]
    assert float(rows["first pass vs model fitted to it"][3].rstrip(" |")) < 1e-3
    # out of sample, the first pass's model misses the slowed run by its 30 %
    assert rows["second pass vs model fitted to the first"][1] == "23"


@pytest.mark.parametrize("kind", ["reduce_scatter", "all_gather", "all_reduce"])
@pytest.mark.parametrize("flat", [False, True], ids=["hierarchical", "flat"])
def test_fp8_halves_the_wire_time_of_bf16_without_latency(kind, flat):
    c = scaling.Cluster(net_hop_latency_s=0.0, nvlink_hop_latency_s=0.0)
    bf16 = scaling.collective_seconds(kind, 1e9, 2.0, 256, c, calls=10, flat=flat, fp8=False)
    fp8 = scaling.collective_seconds(kind, 1e9, 1.0, 256, c, calls=10, flat=flat, fp8=True)
    assert fp8 == pytest.approx(bf16 / 2, rel=1e-12)


def test_latency_counts_ring_steps_flat_and_hierarchical():
    c = scaling.Cluster(net_hop_latency_s=5e-6, nvlink_hop_latency_s=1e-6)
    flat = scaling.collective_seconds("reduce_scatter", 0.0, 2.0, 1024, c, calls=3, flat=True, fp8=False)
    hier = scaling.collective_seconds("reduce_scatter", 0.0, 2.0, 1024, c, calls=3, flat=False, fp8=False)
    assert flat == pytest.approx(3 * 1023 * 5e-6, rel=1e-12)
    assert hier == pytest.approx(3 * (7 * 1e-6 + 127 * 5e-6), rel=1e-12)
    fp8 = scaling.collective_seconds("all_reduce", 0.0, 1.0, 1024, c, calls=1, flat=True, fp8=True)
    assert fp8 == pytest.approx(2 * 1023 * 5e-6 + 2 * 10 * 5e-6, rel=1e-12)  # + the amax tree


def test_fp8_costs_a_step_once_compute_hides_the_wire():
    hidden = scaling.Cluster(tokens_per_gpu=2**20, overlap=1.0)  # compute far longer than any collective
    bf16, fp8 = (scaling.project(scaling.LLAMA_8B, 64, "ddp", p, hidden) for p in ("bf16", "fp8"))
    assert fp8.codec_s > 0 and fp8.step_s > bf16.step_s
    exposed = scaling.Cluster(tokens_per_gpu=1, overlap=0.0)  # nothing hides it: FP8's halved bytes win
    bf16, fp8 = (scaling.project(scaling.LLAMA_8B, 64, "ddp", p, exposed) for p in ("bf16", "fp8"))
    assert fp8.step_s < bf16.step_s


def test_docs_scaling_holds_the_scripts_output():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["comm_model.py"])
        comm_model.main()
    doc = (REPO / "docs" / "scaling.md").read_text()
    missing = [line for line in out.getvalue().splitlines() if line.strip() and line not in doc]
    assert not missing, f"docs/scaling.md is stale; rerun bench/comm_model.py. First missing: {missing[:3]}"
