"""Calibrations of several rounds merged (``calibration_rounds.best_of``, ``calibrate --rounds``)."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
from test_step_memo import _calibration

from bigpicture.perf.calibration_rounds import best_of
from bigpicture.perf.devices import local_cpu
from bigpicture.perf.rates import Rates


def _round(scale: float, engine: tuple[float, float, float]) -> dict:
    """The made-up calibration with every rate times ``scale`` (a slower or faster phase of the host)
    and the engine's costs ``engine``."""
    cal = _calibration()
    cal.update({"matmul": {"float32": {"256": 1e10 * scale}}, "conv2d": [{"flops_per_s": 2e10 * scale}],
                "bandwidth_bytes_per_s": 3e10 * scale, "launch_overhead_s": 2e-6 / scale})  # fmt: skip
    ops = cal["ops"]
    for p in ops["conv"]:
        for k in ("forward", "backward", "backward_weight"):
            p[k] *= scale
    ops["stream"] = {k: [[size, rate * scale] for size, rate in rows] for k, rows in ops["stream"].items()}
    ops["stream_backward"] = copy.deepcopy(ops["stream"])
    ops["pool"] = {k: [[size, rate * scale] for size, rate in rows] for k, rows in ops["pool"].items()}
    ops["engine_node_s"], ops["engine_train_node_s"], ops["wake_s"] = engine
    return cal


def test_best_of_keeps_every_rates_best_round_and_the_median_engine_costs():
    slow, fast = _round(0.5, (3e-5, 9e-5, 4e-4)), _round(1.0, (1e-5, 5e-5, 0.0))
    mid = _round(0.8, (2e-5, 1e-4, 1e-4))
    # one figure faster in the slow round: kept from there (per figure, not per round)
    slow["ops"]["conv"][0]["forward"] = 7 * fast["ops"]["conv"][0]["forward"]
    merged = best_of([slow, fast, mid])
    assert merged["rounds"] == 3
    assert merged["ops"]["conv"][0]["forward"] == slow["ops"]["conv"][0]["forward"]
    for got, want in zip(merged["ops"]["conv"][1:], fast["ops"]["conv"][1:], strict=True):
        assert got == want
    for table in ("stream", "stream_backward", "pool"):
        assert merged["ops"][table] == fast["ops"][table]
    assert merged["matmul"] == fast["matmul"] and merged["conv2d"] == fast["conv2d"]
    assert merged["bandwidth_bytes_per_s"] == fast["bandwidth_bytes_per_s"]
    assert merged["launch_overhead_s"] == fast["launch_overhead_s"]
    # the engine's costs are differences of bests: the median round's, not the least
    assert merged["ops"]["engine_node_s"] == 2e-5
    assert merged["ops"]["engine_train_node_s"] == statistics.median([9e-5, 5e-5, 1e-4])
    assert merged["ops"]["wake_s"] == 1e-4
    # the rounds themselves are not changed; one round is itself
    assert slow["ops"]["engine_node_s"] == 3e-5 and best_of([fast])["ops"] == fast["ops"]


def test_best_of_predicts_as_its_fastest_round_when_one_round_is_fastest_everywhere():
    fast, slow = _round(1.0, (1e-5, 3e-5, 1e-6)), _round(0.6, (1e-5, 3e-5, 1e-6))
    merged = best_of([slow, fast, slow])
    for backward in (False, True, "weight"):
        a = Rates(local_cpu(), torch.float32, merged).conv(2, 72, 8, 1000, 1, backward, cin=8, kernel=9)
        b = Rates(local_cpu(), torch.float32, fast).conv(2, 72, 8, 1000, 1, backward, cin=8, kernel=9)
        assert a == b


def test_best_of_refuses_rounds_measured_differently():
    a, b = _round(1.0, (1e-5, 3e-5, 0.0)), _round(1.0, (1e-5, 3e-5, 0.0))
    b["ops"]["conv"] = b["ops"]["conv"][1:]
    with pytest.raises(ValueError, match="different convolution grids"):
        best_of([a, b])
    c = _round(1.0, (1e-5, 3e-5, 0.0))
    c["ops"]["conv"][0]["cin"] += 1
    with pytest.raises(ValueError, match="disagree on a convolution"):
        best_of([a, c])
    d = _round(1.0, (1e-5, 3e-5, 0.0))
    d["ops"]["stream"]["unary"][0][0] *= 2
    with pytest.raises(ValueError, match="at other sizes"):
        best_of([a, d])
    with pytest.raises(ValueError, match="at least one"):
        best_of([])


def test_calibrate_in_rounds_stores_the_merged_rounds(tmp_path, monkeypatch):
    from bigpicture.perf import calibrate as calibrate_module

    made, measured = iter([(0.5, 1e-5), (1.0, 3e-5)]), []

    def scaled(quick, dtype, clock):  # a made-up round (the measurement itself: other tests)
        scale, wake = next(made)
        ops = _round(scale, (2e-5, 4e-5, wake))["ops"]
        measured.append(copy.deepcopy(ops))
        return ops

    monkeypatch.setattr(calibrate_module, "measure", scaled)
    cal = calibrate_module.calibrate(tmp_path / "cal.json", quick=True, rounds=2)
    assert cal["rounds"] == 2 and len(measured) == 2
    for got, *rounds in zip(cal["ops"]["conv"], *(m["conv"] for m in measured), strict=True):
        assert got["forward"] == max(r["forward"] for r in rounds)
    assert cal["ops"]["wake_s"] == 2e-5  # the median of the rounds' (two: their mean)
    stored = calibrate_module.json.loads((tmp_path / "cal.json").read_text())
    assert stored["rounds"] == 2 and stored["ops"]["conv"] == cal["ops"]["conv"]
    with pytest.raises(ValueError, match="rounds"):
        calibrate_module.calibrate(tmp_path / "x.json", quick=True, rounds=0)
