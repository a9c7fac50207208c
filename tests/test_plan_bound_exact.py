"""The planner's time bound and calibrated rates, made cheaper, give the same numbers bit for bit.

The references are the code as it was (``_old_bound.py``, ``_old_work_bound.py``: verbatim copies;
``test_step_memo._old_conv``: the scalar convolution rate): every pass's work bound and tight bound,
every candidate's time bound, a node's convolution rates forward then backward on one ``Rates``,
on named networks (squeeze-and-excitation passes, dense concatenations, transposed convolutions,
2D and 3D) and random ones (hypothesis), on this CPU uncalibrated and with made-up calibrations
(none read from the cache), and GPUs. And the search chooses the same tile with the same prediction.
"""

from __future__ import annotations

import math

import _old_bound
import _old_work_bound
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_plan_search import net3d, wide_field
from test_planning_speed import calibrated, unet2d
from test_random_architectures import blueprints, examples
from test_step_memo import _calibration, _Dense, _old_conv, _se, one_backward
from torch import nn

from bigpicture.engine.plan import tile_of
from bigpicture.engine.tiles import Diagonal, layout, working_counts
from bigpicture.perf import bound, predict
from bigpicture.perf.devices import get_device, local_cpu
from bigpicture.perf.rates import Rates, _interpolate_segments
from bigpicture.perf.schedule import analyse, candidates, least_time
from bigpicture.perf.search import search
from bigpicture.perf.walk import grads
from bigpicture.perf.work_bound import work_bound

CALIBRATIONS = {  # name: the CPU's calibration (None: uncalibrated)
    "uncalibrated": lambda: None,
    # a grid with holes: the nearest points answer too; as the old code's copies read it (every
    # backward at the full one's rate)
    "made up": lambda: one_backward(_calibration()),
    "by backend": lambda: one_backward({"ops": calibrated().ops}),  # rates that differ by backend and size
}
DEVICES = {"cpu": torch.float32, "H100-SXM": torch.bfloat16, "L4": torch.float32}


def _transposed(nd: int) -> nn.Module:
    conv, up = (nn.Conv2d, nn.ConvTranspose2d) if nd == 2 else (nn.Conv3d, nn.ConvTranspose3d)
    return nn.Sequential(conv(2, 4, 3, padding=1, stride=2), nn.ReLU(), up(4, 3, 4, stride=2, padding=1),
                         nn.ReLU(), conv(3, 2, 3, padding=1))  # fmt: skip


NETWORKS = {  # name: (model, input shape)
    "se 2d": (lambda: _se(2), (1, 2, 45, 38)),
    "se 3d": (lambda: _se(3), (1, 2, 19, 14, 17)),
    "dense 2d": (lambda: _Dense(2), (1, 2, 45, 38)),
    "dense 3d": (lambda: _Dense(3), (1, 2, 19, 14, 17)),
    "transposed 2d": (lambda: _transposed(2), (1, 2, 44, 36)),
    "wide field 2d": (wide_field, (1, 1, 160, 144)),
    "unet 2d": (unet2d, (2, 1, 128, 96)),
    "3d": (net3d, (1, 1, 40, 36, 32)),
}


@pytest.fixture
def calibration(request, monkeypatch):
    """The CPU's calibration for the test's ``setting``, patched where the planner loads it."""
    made = CALIBRATIONS[request.param]()
    monkeypatch.setattr(predict, "load_calibration", lambda: made)
    return made


def _passes(splits, shape, dtype, tile, rates):
    """Per pass whose every tile has work in every sink: (split, layout, dim_tables, grads)."""
    out = []
    for k, s in enumerate(splits):
        lay = layout(s, shape, tile_of(tile, k))
        if any(working_counts(s, lay, sink) != lay.grid for sink in s.sinks) or getattr(
            rates, "fused", False
        ):
            continue
        tables = _old_bound.dim_tables(s, lay)
        if tables is not None:
            out.append((s, lay, tables, grads(s, Diagonal(s, lay).row(0)[1], False)))
    return out


@pytest.mark.parametrize(
    ("device", "calibration"),
    [("cpu", c) for c in CALIBRATIONS] + [(d, "uncalibrated") for d in DEVICES if d != "cpu"],
    indirect=["calibration"],
)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_every_passs_bounds_equal_the_old_ones(name, device, calibration):
    """Per candidate and pass: the work bound (one memo kept over every candidate and pass, against a
    fresh one each time) and the tight bound, and per candidate the time bound at several targets."""
    make, shape = NETWORKS[name]
    torch.manual_seed(0)
    splits, dtype = analyse(make().eval(), shape), DEVICES[device]
    item = torch.empty((), dtype=dtype).element_size()
    shared, old_shared = {}, {}
    rates = predict._setting(device, dtype, None, shared)[1]
    old_rates = predict._setting(device, dtype, None, {})[1]
    memo, checked = {}, 0
    for tile in candidates(splits, shape):
        for training in (False, True):
            for s, lay, tables, grad in _passes(splits, shape, dtype, tile, rates):
                assert _same_tables(bound.dim_tables(s, lay), tables), tile
                got = work_bound(s, tables, lay.grid, item, rates, training, grad, memo)
                want = _old_work_bound.work_bound(s, tables, lay.grid, item, old_rates, training, grad, {})
                assert got == want, (tile, training)
                got = bound.pass_bound(s, lay, dtype, rates, training, (tables, grad))
                assert got == _old_bound.pass_bound(s, lay, dtype, old_rates, training, (tables, grad))
                checked += 1
            whole = predict_time = predict.predict_splits(splits, shape, dtype, tile, device, training).time
            for target in (math.inf, whole, whole / 2, whole / 20):
                got = bound.time_bound(splits, shape, dtype, tile, device, training, shared, target)
                want = _old_bound.time_bound(splits, shape, dtype, tile, device, training, old_shared, target)
                assert got == want, (tile, training, target)
                assert got <= predict_time * (1 + 1e-9)
    assert checked > 0


def _same_tables(got, want) -> bool:
    if (got is None) != (want is None):
        return False
    return got is None or all(
        a.columns == b.columns and (a.lengths == b.lengths).all() and (a.counts == b.counts).all()
        and a.last == b.last for a, b in zip(got, want, strict=True)
    )  # fmt: skip


@pytest.mark.parametrize("calibration", list(CALIBRATIONS), indirect=True)
@pytest.mark.parametrize("name", ["se 2d", "dense 3d", "transposed 2d", "wide field 2d"])
def test_the_search_chooses_as_before(name, calibration, monkeypatch):
    """The pruned search with the new bound and with the old one: the same predictions made, the
    same tiles skipped, hence the same choice and prediction, over a range of budgets."""
    make, shape = NETWORKS[name]
    torch.manual_seed(0)
    splits, dev, dtype = analyse(make().eval(), shape), get_device("cpu"), torch.float32
    tiles = candidates(splits, shape)
    peaks = sorted({predict.predict_splits(splits, shape, dtype, t, "cpu", True).memory for t in tiles})
    for budget in (peaks[-1], peaks[len(peaks) // 2], peaks[0]):
        runs = []
        for module in (bound, _old_bound):
            monkeypatch.setattr("bigpicture.perf.search.time_bound", module.time_bound)
            tried, bounds, _, skipped, needs = search(
                splits, shape, tiles, budget, dev, dtype, True, least_time
            )
            runs.append((tried, bounds, skipped, needs))
        assert runs[0] == runs[1], budget


@given(blueprints(nd=2, dag=True, max_steps=5), st.sampled_from(["cpu", "made up", "by backend", "H100-SXM"]),
       st.booleans())  # fmt: skip
@examples(30)
def test_random_networks_bound_as_before(blueprint, setting, training):
    device = "H100-SXM" if setting == "H100-SXM" else "cpu"
    made = CALIBRATIONS.get(setting, lambda: None)()
    torch.manual_seed(0)
    model, shape = blueprint.build().float().eval(), (1,) + tuple(blueprint.input_shape[1:])
    splits, dtype = analyse(model, shape), DEVICES[device]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict, "load_calibration", lambda: made)
        shared, old_shared = {}, {}
        for tile in candidates(splits, shape):
            got = bound.time_bound(splits, shape, dtype, tile, device, training, shared)
            want = _old_bound.time_bound(splits, shape, dtype, tile, device, training, old_shared)
            assert got == want, tile


@pytest.mark.parametrize("calibration", ["made up", "by backend"])
@pytest.mark.parametrize("nd", [2, 3])
def test_convolution_rates_forward_then_backward_equal_one_at_a_time(calibration, nd):
    """``Rates.convs`` keeps each query's nearest points between its calls (forward, then backward,
    then other nodes): on one ``Rates`` asked over many shapes, the rates of the scalar path."""
    cal = CALIBRATIONS[calibration]()
    rates, fresh = Rates(local_cpu(), torch.float32, cal), Rates(local_cpu(), torch.float32, cal)
    shapes = [(cin, cout, kernel, stride, transposed, backend)
              for cin in (1, 3, 8, 64) for cout in (2, 5, 64) for kernel in (1, 9, 27, None)
              for stride in (1, 2) for transposed in (False, True)
              for backend in (None, "Mkldnn", "Slow2d", "Slow3d", "???")]  # fmt: skip
    positions = [1, 7, 64, 100, 4096, 5000, 10**6, 64, 7]
    for cin, cout, kernel, stride, transposed, backend in shapes:
        fan_in = cin * (kernel or 9)
        for backward in (False, True):
            case = (nd, fan_in, cout, positions, stride, backward, transposed, cin, kernel)
            got = rates.convs(*case, [backend] * len(positions))
            want = [_old_conv(fresh, nd, fan_in, cout, p, stride, backward, transposed, cin, kernel, backend)
                    for p in positions]  # fmt: skip
            assert got == want, (cin, cout, kernel, stride, transposed, backend, backward)


@given(
    st.sampled_from(["unary", "binary", "norm", "copy", "prelu", "norm_strided"]),
    st.booleans(),
    st.lists(st.lists(st.one_of(st.integers(0, 2**44), st.floats(0.0, 2.0**44)), max_size=80), max_size=6),
)
@examples(200)
def test_stream_rates_kept_per_size_equal_the_arrays(kind, backward, asks):
    """``Rates.streams`` keeps the rate of each size of its short queries: one ``Rates`` asked again
    and again, against the segments' arrays on each whole query."""
    rates = Rates(local_cpu(), torch.float32, _calibration())
    for sizes in [*asks, asks[0] if asks else []]:
        nbytes = np.array(sizes, dtype=np.float64)
        table = rates._tables.get(("stream", kind, backward))
        got = rates.streams(kind, nbytes, backward)
        want = _interpolate_segments(rates._tables["stream", kind, backward], nbytes)
        assert table is None or table is rates._tables["stream", kind, backward]
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), sizes
