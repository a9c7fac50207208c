"""The planner's shortcuts predict the same numbers, bit for bit: the memo of steps (``row_memo``,
``steps.MEMO``), the stream rates on table segments, a node's convolution rates at once and the
memoised GPU rates."""

from __future__ import annotations

import functools
import heapq
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bigpicture.perf import classes, combos, geometry, grid, memory_bound, predict, row_memo, steps, walk
from bigpicture.perf.devices import get_device, load_calibration, local_cpu
from bigpicture.perf.predict import predict_splits
from bigpicture.perf.rate_tables import _grid_table, _logs, _table_rate
from bigpicture.perf.rates import Rates, _interpolate_segments, _segments, gpu_conv_rate
from bigpicture.perf.row_memo import StepMemo
from bigpicture.perf.schedule import analyse


def _old_interpolate_many(xs: np.ndarray, ys: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``rates._interpolate_many`` as it was before ``_segments``: the reference."""
    i = np.clip(np.searchsorted(xs, x, side="left"), 1, max(len(xs) - 1, 1))
    x0, x1, y0, y1 = xs[i - 1], xs[np.minimum(i, len(xs) - 1)], ys[i - 1], ys[np.minimum(i, len(xs) - 1)]
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = y0 + np.log(x / x0) / np.log(x1 / x0) * (y1 - y0)
    return np.where(x <= xs[0], ys[0], np.where(x > xs[-1], ys[-1], inside))


_SIZES = st.floats(1.0, 2.0**44, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_SIZES, min_size=1, max_size=8, unique=True),
    st.lists(st.floats(1e6, 1e12), min_size=8, max_size=8),
    st.lists(_SIZES, min_size=0, max_size=40),
)
def test_stream_rates_on_segments_equal_the_old_arrays(xs, ys, x):
    xs = np.array(sorted(xs))
    ys = np.array(ys[: len(xs)])
    x = np.array(x + [xs[0], xs[-1], xs[len(xs) // 2]], dtype=np.float64)  # the table's own points too
    for query in (x, x[:1], x[:0], np.float64(x[0]), np.asarray(x[-1])):
        got, want = _interpolate_segments(_segments(xs, ys), query), _old_interpolate_many(xs, ys, query)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.array_equal(got, want), (xs, ys, query)


def _old_nearest_logs(points, values: list[float], at: tuple[float, ...]) -> float:
    """``rates._nearest_logs`` as it was before ``_nearest_many``: the reference, one query at a time."""
    logs = _logs(at)
    if len(points) > 8:
        far = np.sqrt(((np.asarray(points) - logs) ** 2).sum(axis=1))
        near = far <= np.partition(far, 2)[2] * (1 + 1e-9) + 1e-12
        index = np.flatnonzero(near).tolist()
        points, values = [points[i] for i in index], [values[i] for i in index]
    dist = heapq.nsmallest(3, ((math.dist(logs, p), value) for p, value in zip(points, values, strict=True)))
    if dist[0][0] < 1e-9:
        return dist[0][1]
    weights = [1 / d**2 for d, _ in dist]
    return sum(w * v for w, (_, v) in zip(weights, dist, strict=True)) / sum(weights)


def _old_conv(rates: Rates, nd, fan_in, cout, positions, stride, backward, transposed, cin, kernel, backend):
    """``Rates.conv`` as it was before ``Rates.convs``, without its memo."""
    if rates.gpu:
        return gpu_conv_rate(rates, nd, fan_in, cout, positions, stride, transposed, cin, kernel)
    if rates.ops is None:
        return 0.5 * rates.peak
    value = "backward" if backward else "forward"
    points, gridded = rates._points(nd, transposed)
    if not points:
        return 0.5 * rates.peak
    rate = None
    if cin is not None and kernel is not None and gridded:
        rate = _table_rate(*_grid_table(points, value, stride, kernel, backend), cin, cout, positions)
    if rate is None:
        near = [(p["fan_in"], p["cout"], p["positions"], 4 ** (p["stride"] - 1)) for p in points]
        logs = np.array([_logs(p) for p in near])
        rate = _old_nearest_logs(logs, [p[value] for p in points], (fan_in, cout, positions, 4 ** (min(stride, 2) - 1)))
    return rate


_CALIBRATIONS = {  # device, dtype, calibration (None: none)
    "made up": lambda: ("cpu", torch.float32, _calibration()),
    "this machine's": lambda: ("cpu", torch.float32, load_calibration()),
    "uncalibrated": lambda: ("cpu", torch.float32, None),
    "H100-bf16": lambda: ("H100-SXM", torch.bfloat16, None),
    "T4-fp32": lambda: ("T4", torch.float32, None),
}


@pytest.mark.parametrize("calibration", _CALIBRATIONS)
@settings(max_examples=60, deadline=None)
@given(
    nd=st.sampled_from([2, 3]),
    cin=st.integers(1, 1024),
    cout=st.integers(1, 1024),
    kernel=st.sampled_from([1, 3, 9, 27, 49, None]),
    stride=st.integers(1, 3),
    transposed=st.booleans(),
    backend=st.sampled_from([None, "Slow2d", "Mkldnn", "Slow3d", "SlowTranspose2d", "???"]),
    positions=st.lists(st.integers(1, 10**9), min_size=1, max_size=30),
)
def test_cpu_convolution_rates_of_a_node_equal_one_at_a_time(
    calibration, nd, cin, cout, kernel, stride, transposed, backend, positions
):
    """``Rates.convs`` (a node's rows at once, the nearest-point fallback on arrays; GPU rates and an
    uncalibrated CPU's memoised) against the scalar path it replaced, on fresh rates: the same floats."""
    device, dtype, cal = _CALIBRATIONS[calibration]()
    if cal is None and calibration == "this machine's":
        pytest.skip("this machine is not calibrated")
    dev = local_cpu() if device == "cpu" else get_device(device)
    fan_in = cin * (kernel or 9)
    for backward in (False, True):
        rates = Rates(dev, dtype, cal)
        args = (nd, fan_in, cout, positions, stride, backward, transposed, cin, kernel, [backend] * len(positions))
        got = rates.convs(*args)
        want = [_old_conv(rates, nd, fan_in, cout, p, stride, backward, transposed, cin, kernel, backend)
                for p in positions]  # fmt: skip
        assert got == want
        one = Rates(dev, dtype, cal)  # and one at a time through ``conv``
        kw = {"cin": cin, "kernel": kernel, "backend": backend}
        assert [one.conv(nd, fan_in, cout, p, stride, backward, transposed, **kw) for p in positions] == want


@settings(max_examples=100, deadline=None)
@given(
    factor=st.one_of(st.floats(0.0, 8.0), st.integers(0, 4), st.floats(-1.0, 0.0)),
    basis=st.sampled_from(["operand", "im2col"]),
    kinds=st.sampled_from([{}, {"2": 0, "3": 0, "3t": 0}]),
    nbytes=st.lists(st.tuples(st.integers(0, 2**52), st.integers(0, 2**52)), min_size=1, max_size=20),
)
def test_convolution_workspaces_on_arrays_equal_one_at_a_time(factor, basis, kinds, nbytes):
    rates = Rates(local_cpu(), torch.float32, _calibration())
    rates.conv_workspace = {k: [basis, factor] for k in kinds} or {"2": [basis, factor]}
    operands, im2cols = (np.array(v, dtype=np.int64) for v in zip(*nbytes, strict=True))
    for nd, transposed in ((2, False), (3, False), (3, True)):
        got = rates.workspaces(nd, operands, im2cols, transposed)
        want = [rates.workspace(nd, a, b, transposed) for a, b in nbytes]
        assert got.dtype == np.int64 and got.tolist() == want


@pytest.mark.parametrize("device", ["H100-SXM", "L4", "V100"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_convolution_rates_memoised_equal_the_formula(device, dtype):
    rates = Rates(get_device(device), dtype)
    shapes = [(2, 27, 64, 4096, 1, False, 3, 9), (2, 576, 64, 1_000_003, 2, False, 64, 9),
              (3, 64, 32, 7_777, 1, True, 64, 1), (2, 9, 8, 1, 1, False, None, None)]  # fmt: skip
    for _ in range(2):  # the second time from the memo
        for nd, fan_in, cout, positions, stride, transposed, cin, kernel in shapes:
            for backward in (False, True):
                got = rates.conv(nd, fan_in, cout, positions, stride, backward, transposed, cin=cin, kernel=kernel)
                assert got == gpu_conv_rate(rates, nd, fan_in, cout, positions, stride, transposed, cin, kernel)


def _fields(rows: int, flops_dtype=np.int64) -> dict:
    rng = np.random.default_rng(rows)
    ints = {f: rng.integers(0, 2**40, rows) for f in ("out", "temp", "padded", "saved_extra", "bytes", "flops_bwd")}
    flags = {f: rng.integers(0, 2, rows).astype(bool) for f in ("saves_inputs", "saves_output", "aliases",
                                                                 "keeps_padded")}  # fmt: skip
    return {**ints, **flags, "flops": rng.integers(0, 2**50, rows).astype(flops_dtype),
            "fwd_s": rng.uniform(0, 1, rows), "bwd_s": rng.uniform(0, 1, rows),
            "kind": np.array(["conv", "view", "norm"] * rows, dtype=object)[:rows]}  # fmt: skip


def test_step_memo_reads_back_what_it_computed(monkeypatch):
    memo, calls = StepMemo(), []

    def compute(fields):
        return lambda: calls.append(1) or fields

    first = _fields(5)
    want = {f: v.copy() for f, v in first.items()}
    assert memo.get("a", compute(first)) is first and len(calls) == 1
    again = memo.get("a", compute(_fields(7)))
    assert len(calls) == 1 and again.keys() == want.keys()
    for f, v in want.items():
        assert again[f].dtype == v.dtype and np.array_equal(again[f], v), f
        with pytest.raises(ValueError):  # read-only: no caller can change what the next one reads
            again[f][0] = v[1]
        with pytest.raises(ValueError):  # nor could the one that computed it
            first[f][0] = v[1]
    odd = _fields(3, flops_dtype=np.float64)  # kept as it was built: no cast that could round
    memo.get("b", compute(odd))
    assert memo.get("b", compute(odd)) is odd and odd["flops"].dtype == np.float64 and len(calls) == 2
    monkeypatch.setattr(row_memo, "MAX_ROWS", 8)
    for key in ("c", "d"):
        memo.get(key, compute(_fields(2)))
    assert set(memo.entries) == {"b", "c", "d"} and memo.rows == 7  # the oldest went
    memo.get("e", compute(_fields(9)))  # more than MAX_ROWS alone: kept, every other gone
    assert set(memo.entries) == {"e"} and memo.rows == 9 and [k for k, _ in memo.order] == ["e"]


# -- whole predictions, with the memo and without -----------------------------------------------------


class _Squeeze(nn.Module):
    """Squeeze-and-excitation: a global pooling, so each one ends a pass over the tiles."""

    def __init__(self, c: int, nd: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1) if nd == 2 else nn.AdaptiveAvgPool3d(1)
        self.fc = (nn.Conv2d if nd == 2 else nn.Conv3d)(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(self.pool(x)))


class _Dense(nn.Module):
    """DenseNet-like: each convolution reads the concatenation of every earlier feature map."""

    def __init__(self, nd: int) -> None:
        super().__init__()
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if nd == 2 else (nn.Conv3d, nn.BatchNorm3d)
        self.a, self.b, self.c = conv(2, 3, 3, padding=1), conv(5, 3, 3, padding=1), conv(8, 4, 1)
        self.norm, self.pool = norm(8), (nn.AvgPool2d if nd == 2 else nn.AvgPool3d)(2)
        self.d = conv(4, 2, 3, padding=1, stride=2)

    def forward(self, x):
        x = torch.cat([x, torch.relu(self.a(x))], 1)
        x = torch.cat([x, self.b(x)], 1)
        return self.d(self.pool(self.c(torch.relu(self.norm(x)))))


def _se(nd: int) -> nn.Module:
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if nd == 2 else (nn.Conv3d, nn.BatchNorm3d)
    return nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), _Squeeze(4, nd), conv(4, 4, 3, stride=2, padding=1),
                         norm(4), nn.ReLU(), _Squeeze(4, nd), nn.MaxPool2d(2) if nd == 2 else nn.MaxPool3d(2),
                         conv(4, 4, 3, padding=1), _Squeeze(4, nd), conv(4, 2, 1))  # fmt: skip


def _calibration() -> dict:
    """A calibrated CPU of made-up numbers with what the real ones have: a grid of convolutions per
    backend with holes (so the nearest-point fallback runs too), the weights' gradient at rates of its
    own, streams with a strided norm."""
    rng = np.random.default_rng(1)
    conv = [{"nd": nd, "cin": c, "cout": o, "kernel": k, "fan_in": c * k ** (nd - 1) // (3 ** (nd - 2)),
             "positions": p, "stride": s, "transposed": False, "backend": b,
             "forward": float(rng.uniform(1e9, 5e10)), "backward": float(rng.uniform(5e8, 2e10))}
            for nd in (2, 3) for c in (2, 8) for o in (2, 8) for k in (1, 9) for p in (64, 4096)
            for s in (1, 2) for b in ("Slow2d", "Mkldnn", "Slow3d") if rng.uniform() > 0.3]  # fmt: skip
    for p in conv:  # the weights' gradient alone: 1.5-3.5x the full backward's rate (no draw: rest kept)
        p["backward_weight"] = p["backward"] * (1.5 + p["cin"] * p["cout"] * p["positions"] % 7 / 3)
    stream = {k: [[2.0**e, float(rng.uniform(1e9, 2e10))] for e in (6, 12, 18, 24)]
              for k in ("unary", "binary", "norm", "copy", "prelu", "norm_strided")}  # fmt: skip
    pool = [[2.0**e, float(rng.uniform(1e8, 1e10))] for e in (6, 14, 22)]
    return {"ops": {"dtype": "float32", "conv": conv, "stream": stream, "stream_backward": stream,
                    "pool": {"forward": pool, "backward": pool}, "engine_node_s": 3e-5,
                    "engine_train_node_s": 9e-5, "wake_s": 2e-6,
                    "conv_workspace": {"2": ["operand", 1.0], "3": ["im2col", 1.0]}}}  # fmt: skip


def one_backward(cal: dict | None) -> dict | None:
    """``cal`` as the code before the weights' gradient had rates of its own read it: without them,
    every backward at the full backward's rate (the tests of the old code's copies compare on it)."""
    if cal is None:
        return None
    conv = [{k: v for k, v in p.items() if k != "backward_weight"} for p in cal["ops"]["conv"]]
    return {**cal, "ops": {**cal["ops"], "conv": conv}}


NETWORKS = {"se": _se, "dense": _Dense}
SHAPES = {2: (1, 2, 45, 38), 3: (1, 2, 19, 14, 17)}
TILES = {2: (8, 16, (12, 24), 64), 3: (4, 8, 24)}  # tiles touching the borders, interior ones, one tile
SETTINGS = {  # device, dtype, calibration (None: the uncalibrated CPU's nominal rates)
    "cpu-uncalibrated": ("cpu", torch.float32, None),
    "cpu-calibrated": ("cpu", torch.float32, "made up"),
    "H100-bf16": ("H100-SXM", torch.bfloat16, None),
    "L4-fp32": ("L4", torch.float32, None),
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("network", NETWORKS)
def test_predictions_with_the_memo_equal_those_without(network, nd, setting, monkeypatch, one_thread):
    """Every candidate of one planner predicted with one ``shared`` (the memo filled by the earlier
    candidates and passes) against each predicted afresh without it, and with the last tile walked
    on its own (``predict.LAST_FROM_CLASSES``): the same floats, everywhere."""
    device, dtype, calibration = SETTINGS[setting]
    torch.manual_seed(0)
    shape = SHAPES[nd]
    splits = analyse(NETWORKS[network](nd).eval(), shape)
    if network == "se":
        assert len(splits) == 4  # three squeezes: four passes, each recomputing the earlier ones

    def rates():
        made = Rates(get_device(device) if device != "cpu" else local_cpu(), dtype,
                     _calibration() if calibration else None)  # fmt: skip
        assert made.measured == bool(calibration)
        return {"rates": made}

    shared = rates()
    for training, input_grad in ((False, False), (True, False), (True, True)):  # the first conv: grad_in
        for tile in TILES[nd]:
            for on in (True, False):  # the last tile read off its class, or walked on its own
                monkeypatch.setattr(steps, "MEMO", on)
                monkeypatch.setattr(predict, "LAST_FROM_CLASSES", on)
                if on:
                    got = predict_splits(splits, shape, dtype, tile, device, training, input_grad, shared=shared)
                else:
                    want = predict_splits(splits, shape, dtype, tile, device, training, input_grad, shared=rates())
            assert got == want, (tile, training, input_grad)
            assert got.by_kind == want.by_kind and got.memory_parts == want.memory_parts
    assert len(shared["rates"]._steps.entries) > 0  # the memo was used


@pytest.mark.parametrize("calibration", [None, "made up"])
def test_the_bounds_rows_and_the_predictions_share_the_memo_where_alike(calibration, monkeypatch):
    """``least`` (the time bound's faster of a normalisation's rates) changes a normalisation's steps
    only, and ``grad_in`` a convolution's: the memo keys them there alone, so every node's steps on
    the same rows, in any order of asking, equal those built afresh."""
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    split = analyse(net, (1, 2, 32, 32))[-1]
    make = lambda: Rates(local_cpu(), torch.float32, _calibration() if calibration else None)  # noqa: E731
    memo = make()
    for node in (n for n in split.order if n in split.ops):
        inputs = tuple((i, np.array([100, 144, 81], dtype=np.int64)) for i in split.ops[node].inputs)
        rows = steps.Rows(np.array([64, 100, 49]), inputs, np.array([[10, 10], [12, 12], [9, 9]]),
                          np.ones((3, 2), dtype=np.int64), np.zeros(3, dtype=bool), np.array([True, False, True]))  # fmt: skip
        for least, grad_in in ((True, False), (False, False), (False, True), (True, True)):
            monkeypatch.setattr(steps, "MEMO", True)
            got = steps.steps_of(split, node, rows, 4, memo, grad_in, least)
            monkeypatch.setattr(steps, "MEMO", False)
            want = steps.steps_of(split, node, rows, 4, make(), grad_in, least)
            for f in steps._FIELDS:
                assert np.array_equal(getattr(got, f), getattr(want, f)), (node, least, grad_in, f)


# -- whole predictions, with the planner's cheaper bookkeeping and with what it replaced ----------------


def _old_geometries(split, node, need, stored):
    """``steps.geometries`` before ``padded_bounds`` (boxes built, as the engine builds them)."""
    from bigpicture.engine.rules import Window
    from bigpicture.engine.rules.resample import ConvTranspose, Pad

    op, box = split.ops[node], need[node]
    shapes = [box.shape] + [need[i].shape for i in op.inputs if i in need]
    lengths = list(zip(*shapes, strict=True))
    nd = split.nd
    outside = differ = (False,) * nd
    if isinstance(op, (Window, Pad)):
        padded, extent = op.padded_box(box), op.in_extents[0]
        outside = tuple(a < 0 or b > n for a, b, n in zip(padded.lo, padded.hi, extent, strict=True))
        if isinstance(op, Window):
            differ = tuple(padded.dim(d) != stored.dim(d) for d in range(nd))
    elif steps._facts(split, node)[0] in steps._NORM:
        differ = _old_strided_input(split, op, box, need)
    extra = op.needs(box)[0].shape if isinstance(op, ConvTranspose) else (0,) * nd
    return tuple(zip(lengths, outside, differ, extra, strict=True))


def _old_strided_input(split, op, box, need):
    """``steps._strided_input`` before ``steps._crops``."""
    from bigpicture.engine.rules import Window

    first = op.inputs[0] if op.inputs else None
    if first is None or first not in need or need[first].empty:
        return (False,) * split.nd
    sub = tuple(box.dim(d) != need[first].dim(d) for d in range(split.nd))
    producer = split.ops.get(first)
    if isinstance(producer, Window) and producer.pads_natively(True):
        return tuple(a or b for a, b in zip(sub, producer.crops(need[first]), strict=True))
    return sub


def _old_spatial_inputs(split, node, need):
    return [i for i in split.ops[node].inputs if i is split.input or (i in need and not need[i].empty)]


def _old_lengths(op, boxes, need, d):
    from bigpicture.engine.rules import Window
    from bigpicture.engine.rules.resample import ConvTranspose

    box = need[boxes[0]]
    padded = op.padded_box(box).length(d) if isinstance(op, Window) else 1
    extra = op.needs(box)[0].length(d) if isinstance(op, ConvTranspose) else 1
    return [need[n].length(d) for n in boxes] + [padded, extra]


def _old_unique_rows(table):
    _, first, inverse = np.unique(table, axis=0, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def _old_structures(steps_, index, rows):
    which = np.zeros(rows, dtype=np.int64)
    for st_, pick in zip(steps_, index, strict=True):
        _, which = np.unique(which * 16 + walk.structure(st_)[pick], return_inverse=True)
    return which.reshape(-1)


def _old_bookkeeping(monkeypatch):
    """The planner's bookkeeping as it was: geometries on boxes, features through ``features``,
    distinct rows by ``np.unique``, structures renumbered after every step; its caches emptied."""
    monkeypatch.setattr(steps, "geometries", _old_geometries)
    monkeypatch.setattr(geometry, "geometries", _old_geometries)
    monkeypatch.setattr(grid, "supported", lambda split: False)  # every row by row, on the old geometries
    if hasattr(memory_bound, "geometries"):  # its rows made on their own since cbdc8e0 (test_memory_rows)
        monkeypatch.setattr(memory_bound, "geometries", _old_geometries)
    monkeypatch.setattr(classes, "_lengths", _old_lengths)
    for module in (steps, geometry, memory_bound):
        monkeypatch.setattr(module, "spatial_inputs", _old_spatial_inputs)
    monkeypatch.setattr(combos, "unique_rows", _old_unique_rows)
    monkeypatch.setattr(walk, "structures", _old_structures)
    monkeypatch.setattr(
        classes._Grid, "geometry_features",
        lambda self, node, copy: self.features(lambda j, d: self.geometry(j, copy)[node][d]),
    )  # fmt: skip
    for cache in ("_CLASSES", "_DIAGONALS"):
        monkeypatch.setattr(grid, cache, {})


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("network", NETWORKS)
def test_predictions_equal_those_of_the_old_bookkeeping(network, nd, setting, monkeypatch, one_thread):
    """Every candidate tile predicted with the planner's bookkeeping and with the old one (each on
    fresh rates, without the step memo): the same floats, everywhere."""
    device, dtype, calibration = SETTINGS[setting]
    torch.manual_seed(0)
    shape = SHAPES[nd]
    splits = analyse(NETWORKS[network](nd).eval(), shape)
    monkeypatch.setattr(steps, "MEMO", False)

    def rates():
        made = Rates(get_device(device) if device != "cpu" else local_cpu(), dtype,
                     _calibration() if calibration else None)  # fmt: skip
        return {"rates": made}

    cases = [(t, training, input_grad) for t in TILES[nd] for training, input_grad in
             ((False, False), (True, False), (True, True))]  # fmt: skip
    for cache in ("_CLASSES", "_DIAGONALS"):
        monkeypatch.setattr(grid, cache, {})
    got = [predict_splits(splits, shape, dtype, t, device, tr, ig, shared=rates()) for t, tr, ig in cases]
    with monkeypatch.context() as old:
        _old_bookkeeping(old)
        want = [predict_splits(splits, shape, dtype, t, device, tr, ig, shared=rates()) for t, tr, ig in cases]
    for g, w, case in zip(got, want, cases, strict=True):
        assert g == w, case
        assert g.by_kind == w.by_kind and g.memory_parts == w.memory_parts


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_crops_of_interior_boxes_equal_the_engines(data):
    """``steps._crops`` (none inside the image, without boxes) against ``crops`` of the engine's op."""
    from bigpicture.engine.box import Box
    from bigpicture.engine.rules import Window

    ops = _WINDOWS()
    op = data.draw(st.sampled_from(ops))
    lo = [data.draw(st.integers(-3, e + 3)) for e in op.in_extents[0]]
    hi = [a + data.draw(st.integers(-1, 20)) for a in lo]
    box = Box(tuple(lo), tuple(hi))
    assert isinstance(op, Window) and steps._crops(op, box) == op.crops(box)


def _windows() -> list:
    net = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.MaxPool2d(3, 2, padding=1),
                        nn.Conv2d(4, 4, 5, padding=4, dilation=2), nn.Conv2d(4, 4, 4, stride=3, padding=2),
                        nn.AvgPool2d(3, 1, padding=1), nn.Conv2d(4, 2, 1)).eval()  # fmt: skip
    split = analyse(net, (1, 2, 37, 41))[-1]
    from bigpicture.engine.rules import Window

    return [op for op in split.ops.values() if isinstance(op, Window) and op.pads_natively(True)]


_WINDOWS = functools.cache(_windows)
