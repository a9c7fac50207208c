"""``rate_tables._nearest_rates`` with its queries of 3 candidates unrolled equals the loop before it
(``tests/_old_nearest.py``), bit for bit (==): grids measured several times (ties in distance, in
rate, and both), heads on the grid and off it, positions on its points, between and beyond them,
one kind of rate or two; and ``Rates._nearest`` (the points' logs kept per kind of convolution)
against the old per-head reading on this machine's calibration and a made-up one."""

from __future__ import annotations

import itertools
import math

import _old_nearest as old
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_step_memo import _calibration

from bigpicture.perf.devices import load_calibration, local_cpu
from bigpicture.perf.rate_tables import _logs, _near_points, _nearest_rates
from bigpicture.perf.rates import Rates


@settings(max_examples=400, deadline=None)
@given(
    grid=st.tuples(*[st.lists(st.integers(1, 1 << 20), min_size=1, max_size=4, unique=True)] * 3),
    strides=st.sampled_from([[1], [4], [1, 4]]),
    repeats=st.integers(1, 3),
    rates=st.sampled_from(["spread", "few", "one"]),
    kinds=st.integers(1, 3),
    head=st.tuples(st.integers(1, 1 << 20), st.integers(1, 1 << 20), st.sampled_from([1, 4])),
    positions=st.lists(st.integers(0, 1 << 34), min_size=1, max_size=60),
    on_grid=st.booleans(),
)
def test_nearest_rates_equal_the_old(grid, strides, repeats, rates, kinds, head, positions, on_grid):
    points = [p for p in itertools.product(*grid, strides) for _ in range(repeats)]
    rng = np.random.default_rng(len(points) + repeats)
    draw = {"spread": lambda: rng.uniform(1e8, 1e11, len(points)), "few": lambda: rng.choice([1e9, 3e9], len(points)),
            "one": lambda: np.full(len(points), 2e9)}[rates]  # fmt: skip
    values = tuple(draw().tolist() for _ in range(kinds))
    if on_grid:  # a head of the grid's own: ties along every coordinate but positions
        head = (grid[0][head[0] % len(grid[0])], grid[1][head[1] % len(grid[1])], strides[head[2] % len(strides)])
    positions = positions + grid[2] + [max(grid[2]) * 3, 1] + [int(math.sqrt(a * b)) for a in grid[2] for b in grid[2]]
    logs = np.array([_logs(p) for p in points])
    near = _near_points(logs, _logs((head[0], head[1], 1, head[2])), values)
    xs = [math.log(max(p, 1)) for p in positions]
    assert _nearest_rates(near, xs) == old._nearest_rates(near, xs)


def test_nearest_rates_on_exact_ties():
    """Points equally far from a query (positions 4 and 16 from 8, in logs), measured twice at each
    place with rates in either order, the query on a point (the nearest alone), 3 candidates tied."""
    points = [(8, 8, 4, 1), (8, 8, 16, 1), (8, 8, 4, 1), (8, 8, 16, 1), (8, 2, 8, 1), (2, 8, 8, 4)]
    logs = np.array([_logs(p) for p in points])
    for values in ([1e9, 2e9, 2e9, 1e9, 5e9, 7e9], [3e9, 3e9, 1e9, 1e9, 1e9, 2e9]):
        for chosen in (points, points[::2], points[1:4]):
            index = [points.index(p) for p in chosen]
            sub = (np.array([_logs(p) for p in chosen]), ([values[i] for i in index], [values[::-1][i] for i in index]))
            for fan_in, cout in ((8, 8), (8, 2), (2, 8)):
                near = _near_points(sub[0], _logs((fan_in, cout, 1, 1)), sub[1])
                xs = [math.log(p) for p in (8, 4, 16, 5, 1, 1 << 30)]
                assert _nearest_rates(near, xs) == old._nearest_rates(near, xs)
    assert len(logs) == 6


CALIBRATIONS = {"made up": _calibration, "this machine's": load_calibration}


@pytest.mark.parametrize("calibration", CALIBRATIONS)
def test_rates_nearest_equal_per_head_reading(calibration):
    """``Rates._nearest`` over heads of several convolutions (the points' logs read once) against
    ``_near_points`` and the old ``_nearest_rates`` on logs read per head."""
    cal = CALIBRATIONS[calibration]()
    if cal is None:
        pytest.skip("this machine is not calibrated")
    rates = Rates(local_cpu(), torch.float32, cal)
    positions = [1, 7, 64, 4096, 50_000, 1 << 20, 3 << 30]
    for nd, transposed in ((2, False), (3, False), (2, True)):
        points = rates._points(nd, transposed)[0]
        if not points:
            continue
        near = [(p["fan_in"], p["cout"], p["positions"], 4 ** (p["stride"] - 1)) for p in points]
        values = tuple([p[v] for p in points] for v in ("forward", "backward", "backward_weight"))
        for head in ((9, 16, 1), (576, 64, 1), (27, 3, 4), (1152, 128, 4), (1, 1, 1)):
            logs = np.array([_logs(p) for p in near])
            want = old._nearest_rates(_near_points(logs, _logs((*head[:2], 1, head[2])), values),
                                      [math.log(max(p, 1)) for p in positions])  # fmt: skip
            assert rates._nearest(nd, transposed, head, positions) == want
