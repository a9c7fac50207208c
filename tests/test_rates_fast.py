"""The convolution rates read per context (``rate_tables._near_points`` / ``_nearest_rates``,
``_table_rates`` weighing a position's corners once, ``conv_rates`` on rows keyed by one integer)
equal those of the code before them (``tests/_old_rate_tables.py``, ``tests/_old_conv_rates.py``),
bit for bit (==): the nearest measurements over grids measured several times (ties in distance, in
rate, and both), queries on the grid's points, between them and beyond its edges; whole steps and
``Prediction``s of named networks on this machine's calibration and a made-up one."""

from __future__ import annotations

import dataclasses
import itertools
import math

import _old_conv_rates as old
import _old_rate_tables as old_tables
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_step_memo import _calibration, _old_nearest_logs, one_backward
from test_step_rates_fast import NAMED, convolutions
from torch import nn

from bigpicture.perf import conv_rates, steps
from bigpicture.perf.devices import load_calibration, local_cpu
from bigpicture.perf.predict import predict_splits
from bigpicture.perf.rate_tables import _logs, _near_points, _nearest, _nearest_rates, _table_rates
from bigpicture.perf.rates import Rates
from bigpicture.perf.row_memo import Rows
from bigpicture.perf.schedule import analyse
from bigpicture.perf.unique_rows import unique_rows

CALIBRATIONS = {"made up": _calibration, "this machine's": load_calibration}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _old_conv_rates(*args):
    """The old ``conv_rates``, called as ``steps`` calls the new one (whose last argument, whether the
    input needs a gradient, the old one did not take: its backward was always at the full rate)."""
    return old.conv_rates(*args[:12])


def _new_and_old(calibration: str) -> tuple[Rates, old.OldRates]:
    cal = one_backward(CALIBRATIONS[calibration]())  # the old code rates every backward at the full one's
    if cal is None:
        pytest.skip("this machine is not calibrated")
    return Rates(local_cpu(), torch.float32, cal), old.OldRates(local_cpu(), torch.float32, cal)


# -- the nearest measurements -------------------------------------------------------------------------


def _old_nearest(logs: np.ndarray, values: tuple, ats: list) -> list[tuple]:
    """The old ``_nearest_many`` per kind of value, as ``Rates.convs`` asked it (one ``kept`` shared)."""
    kept: dict = {}
    found = [old_tables._nearest_many(logs, kind, ats, kept) for kind in values]
    return list(zip(*found, strict=True))


@settings(max_examples=300, deadline=None)
@given(
    grid=st.tuples(*[st.lists(st.integers(1, 1 << 20), min_size=1, max_size=4, unique=True)] * 3),
    strides=st.sampled_from([[1], [4], [1, 4]]),
    repeats=st.integers(1, 3),
    rates=st.sampled_from(["spread", "few", "one"]),
    head=st.tuples(st.integers(1, 1 << 20), st.integers(1, 1 << 20), st.sampled_from([1, 4])),
    positions=st.lists(st.integers(0, 1 << 34), min_size=1, max_size=40),
    on_grid=st.booleans(),
)
def test_nearest_rates_equal_the_old(grid, strides, repeats, rates, head, positions, on_grid):
    """``_nearest_rates`` on ``_near_points`` (the points that can be nearest kept once per head,
    each query measured by ``math.dist`` among numpy's few) against the old ``_nearest_many`` and
    the older one-query reference: grids of points measured several times (ties in distance), of
    rates drawn from few values (ties in rate too), heads and positions on the grid or off it,
    beyond its edges, 0 and 1 (log 0)."""
    points = [p for p in itertools.product(*grid, strides) for _ in range(repeats)]
    rng = np.random.default_rng(len(points) + repeats)
    draw = {"spread": lambda: rng.uniform(1e8, 1e11, len(points)), "few": lambda: rng.choice([1e9, 3e9], len(points)),
            "one": lambda: np.full(len(points), 2e9)}[rates]  # fmt: skip
    values = (draw().tolist(), draw().tolist())
    if on_grid:  # a head of the grid's own: ties along every coordinate but positions
        head = (grid[0][head[0] % len(grid[0])], grid[1][head[1] % len(grid[1])], strides[head[2] % len(strides)])
    positions = positions + grid[2] + [max(grid[2]) * 3, 1]
    ats = [(head[0], head[1], p, head[2]) for p in positions]
    logs = np.array([_logs(p) for p in points])
    near = _near_points(logs, _logs((head[0], head[1], 1, head[2])), values)
    got = _nearest_rates(near, [math.log(max(p, 1)) for p in positions])
    assert got == _old_nearest(logs, values, ats)
    assert [g[0] for g in got] == [_old_nearest_logs(logs, values[0], at) for at in ats]
    assert [_nearest(points, values[1], at) for at in ats[:5]] == [g[1] for g in got[:5]]


def test_nearest_rates_on_exact_ties():
    """Points equally far from a query (positions 4 and 16 from 8, in logs), measured twice at each
    place with rates in either order, and the query on a point (the nearest alone)."""
    points = [(8, 8, 4, 1), (8, 8, 16, 1), (8, 8, 4, 1), (8, 8, 16, 1), (8, 2, 8, 1), (2, 8, 8, 4)]
    logs = np.array([_logs(p) for p in points])
    for values in ([1e9, 2e9, 2e9, 1e9, 5e9, 7e9], [3e9, 3e9, 1e9, 1e9, 1e9, 2e9]):
        for fan_in, cout in ((8, 8), (8, 2), (2, 8)):
            ats = [(fan_in, cout, p, 1) for p in (8, 4, 16, 5, 1, 1 << 30)]
            near = _near_points(logs, _logs((fan_in, cout, 1, 1)), (values, values[::-1]))
            got = _nearest_rates(near, [math.log(p) for _, _, p, _ in ats])
            assert got == _old_nearest(logs, (values, values[::-1]), ats)


# -- the calibrated table -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    axes=st.tuples(*[st.lists(st.integers(1, 4096), min_size=1, max_size=4, unique=True)] * 3),
    holes=st.lists(st.booleans(), min_size=64, max_size=64),
    zeros=st.lists(st.booleans(), min_size=64, max_size=64),
    cin=st.integers(1, 5000),
    cout=st.integers(1, 5000),
    positions=st.lists(st.integers(1, 10**7), min_size=0, max_size=30),
    huge=st.sampled_from([[], [1 << 53], [(1 << 53) - 1, (1 << 60) + 3]]),
    minus=st.booleans(),
)
def test_table_rates_equal_the_old(axes, holes, zeros, cin, cout, positions, huge, minus):
    """``_table_rates`` (numpy over the positions) against the old loop: grids with holes (corners
    left out of the weights, none left: None) and zero rates, queries on, between and beyond the
    grid's values, positions past 2**53 (``_table_rate``'s), a negative rate (both refuse it alike)."""
    axes = [sorted(a) for a in axes]
    rng = np.random.default_rng(len(positions))
    corners = [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]
    table = {k: (0.0 if z else float(rng.uniform(1e8, 1e11))) for k, h, z in zip(corners, holes, zeros) if not h}
    positions = positions + axes[2] + [axes[2][0] - 1 or 1, axes[2][-1] + 1] + huge
    if minus and table:
        table[next(iter(table))] = -1e9
    try:
        want = old_tables._table_rates(table, axes, cin, cout, positions)
    except ValueError:  # ``math.log`` of the negative rate
        with pytest.raises(ValueError):
            _table_rates(table, axes, cin, cout, positions)
        return
    assert _table_rates(table, axes, cin, cout, positions) == want


# -- a convolution's rates, and whole predictions -------------------------------------------------------


def _fresh_backends(monkeypatch) -> None:
    monkeypatch.setattr(conv_rates, "_known", {})
    monkeypatch.setattr(old, "_known", {})
    monkeypatch.setattr(old, "_count", [0])


@pytest.mark.parametrize("calibration", CALIBRATIONS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                 HealthCheck.function_scoped_fixture])  # fmt: skip
@given(case=convolutions(), grad_in=st.booleans(), batch=st.sampled_from([1, 2, 16]))
def test_conv_steps_equal_the_old(calibration, case, grad_in, batch, monkeypatch):
    """A convolution's steps on hypothesis-made rows (repeated boxes, empty ones, boxes too small for
    the kernel), its rates asked twice (afresh, then read back), against the old ``conv_rates``."""
    net, nd, cin, boxes, numel = case
    split = analyse(net.eval(), (batch, cin) + (24,) * nd)[-1]
    node = next(n for n in split.order if n in split.ops)
    r, ones = len(numel), np.ones((len(numel), nd), dtype=np.int64)
    transposed = isinstance(net[0], nn.ConvTranspose2d | nn.ConvTranspose3d)
    inputs = tuple((i, numel.copy()) for i in split.ops[node].inputs)
    rows = Rows(numel, inputs, ones if transposed else boxes, boxes if transposed else ones,
                np.zeros(r, dtype=bool), np.zeros(r, dtype=bool))  # fmt: skip
    _fresh_backends(monkeypatch)
    new, was = _new_and_old(calibration)
    with monkeypatch.context() as patch:
        patch.setattr(steps, "conv_rates", _old_conv_rates)
        want = steps._steps_of(split, node, rows, 4, was, grad_in)
    for _ in range(2):
        got = steps._steps_of(split, node, rows, 4, new, grad_in)
        for f in steps._FIELDS:
            a, b = getattr(got, f), getattr(want, f)
            assert a.dtype == b.dtype and a.tolist() == b.tolist(), f


@pytest.mark.parametrize("calibration", CALIBRATIONS)
@pytest.mark.parametrize("name", NAMED)
def test_predictions_equal_the_old(name, calibration, monkeypatch):
    model, shape, tiles = NAMED[name]
    torch.manual_seed(0)
    splits = analyse(model().eval(), shape)
    modes = [(True, False)] if name == "SENet154 2d" else [(False, False), (True, False), (True, True)]
    _fresh_backends(monkeypatch)
    new, was = _new_and_old(calibration)
    for training, input_grad in modes:
        for tile in tiles:
            with monkeypatch.context() as patch:
                patch.setattr(steps, "conv_rates", _old_conv_rates)
                patch.setattr(steps, "MEMO", False)
                want = predict_splits(splits, shape, torch.float32, tile, "cpu", training, input_grad,
                                      shared={"rates": was})  # fmt: skip
            got = predict_splits(splits, shape, torch.float32, tile, "cpu", training, input_grad, shared={"rates": new})
            for f in dataclasses.fields(want):
                assert getattr(got, f.name) == getattr(want, f.name), (f.name, tile, training, input_grad)


@settings(max_examples=300, deadline=None)
@given(
    columns=st.integers(1, 4),
    rows=st.integers(0, 60),
    top=st.sampled_from([0, 1, 7, 1000, 1 << 20, 1 << 40, (1 << 62) + 5]),
    negative=st.booleans(),
    seed=st.integers(0, 1 << 16),
)
def test_distinct_rows_equal_numpys(columns, rows, top, negative, seed):
    """The distinct rows ``conv_rates`` rates (``unique_rows``: rows packed into int64 keys) against
    ``np.unique(axis=0)``: repeated rows, a column of one value, keys just within and beyond 63 bits,
    negative entries."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(-top if negative else 0, top + 1, size=(max(rows // 3, 1), columns), dtype=np.int64)
    pool[:, 0] = pool[0, 0] if seed % 3 == 0 else pool[:, 0]
    table = pool[rng.integers(0, len(pool), size=rows)]
    first, inverse = unique_rows(table)
    distinct = table[first]
    want, back = np.unique(table, axis=0, return_inverse=True)
    assert distinct.dtype == want.dtype and distinct.shape == want.shape and np.array_equal(distinct, want)
    assert inverse.tolist() == back.reshape(-1).tolist()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=convolutions(), batch=st.sampled_from([1, 2, 16]))
def test_backends_equal_the_old(case, batch, monkeypatch):
    """``backends_of`` (torch's answer named by its enum value) against the old one (named by the
    enum member): hypothesis-made convolutions and boxes, small, large and too small for the kernel."""
    net, nd, cin, boxes, _ = case
    split = analyse(net.eval(), (batch, cin) + (24,) * nd)[-1]
    op = split.ops[next(n for n in split.order if n in split.ops)]
    transposed = isinstance(net[0], nn.ConvTranspose2d | nn.ConvTranspose3d)
    cout = net[0].out_channels
    rates = _new_and_old("this machine's")[0]
    _fresh_backends(monkeypatch)
    boxes = boxes.tolist() + [[s] * nd for s in (1, 7, 40, 300)]
    want = old.backends_of(op, boxes, batch, cin, cout, transposed, rates)
    assert conv_rates.backends_of(op, boxes, batch, cin, cout, transposed, rates) == want


def test_backend_members_have_distinct_values():
    """``_select`` names torch's answer by its value: one value per member."""
    members = getattr(torch._C, "_ConvBackend", None)
    if members is None:
        pytest.skip("this torch has no _ConvBackend")
    values = [m.value for m in members.__members__.values()]
    assert len(set(values)) == len(values)


@pytest.mark.parametrize("calibration", CALIBRATIONS)
def test_conv_rates_on_positions_past_the_keys_equal_the_old(calibration, monkeypatch):
    """Rows of positions past ``conv_rows``' keys (2**54 and more: rated as lists), positions of 0
    (no work), asked twice, and then rows of the same convolution that fit the keys."""
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
    split = analyse(net.eval(), (1, 8, 24, 24))[-1]
    op = split.ops[next(n for n in split.order if n in split.ops)]
    lengths = np.array([[5, 5], [40, 40], [5, 5], [300, 7], [1, 1]], dtype=np.int64)
    huge = np.array([1 << 54, 3, (1 << 60) + 1, 0, 7], dtype=np.int64)
    small = np.array([9, 3, 4096, 0, 7], dtype=np.int64)
    _fresh_backends(monkeypatch)
    new, was = _new_and_old(calibration)
    for positions in (huge, huge, small, small):
        args = (op, lengths, positions, 1, 8, 16, False, 2, 72, 1, (False, 8, 9))
        got, want = conv_rates.conv_rates(*args, new), old.conv_rates(*args, was)
        assert [a.tolist() for a in got] == [a.tolist() for a in want]
