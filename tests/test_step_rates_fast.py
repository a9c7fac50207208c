"""A convolution's rates on its distinct rows (``conv_rates``) equal those asked row by row (the old
``steps._conv_steps``, ``tests/_old_conv_steps.py``): every field of its steps and of whole
``Prediction``s, bit for bit (==), over named networks and hypothesis-made convolutions and rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _old_conv_steps import old_backend, old_conv_steps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pass_batch import CASES, _monai
from test_step_memo import _calibration, one_backward
from torch import nn

from bigpicture.perf import conv_rates, steps
from bigpicture.perf.devices import get_device, load_calibration, local_cpu
from bigpicture.perf.predict import predict_splits
from bigpicture.perf.rate_tables import _table_rate, _table_rates
from bigpicture.perf.rates import Rates
from bigpicture.perf.row_memo import Rows
from bigpicture.perf.schedule import analyse

SETTINGS = {  # device, dtype, calibration
    "cpu-uncalibrated": ("cpu", torch.float32, lambda: None),
    "cpu-made-up": ("cpu", torch.float32, _calibration),
    "cpu-this-machine": ("cpu", torch.float32, load_calibration),
    "H100-bf16": ("H100-SXM", torch.bfloat16, lambda: None),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _rates(setting: str) -> Rates:
    device, dtype, calibration = SETTINGS[setting]
    cal = calibration()
    if setting == "cpu-this-machine" and cal is None:
        pytest.skip("this machine is not calibrated")
    # the old code's copies rate every backward at the full one's
    return Rates(get_device(device) if device != "cpu" else local_cpu(), dtype, one_backward(cal))


def _fresh_backends(monkeypatch) -> None:
    monkeypatch.setattr(conv_rates, "_known", {})


# -- whole predictions --------------------------------------------------------------------------------

NAMED = {
    **{
        k: CASES[k]
        for k in (
            "se 2d",
            "se 3d",
            "dense 2d",
            "SEResNet50 2d",
            "SEResNet50 3d",
            "UNet 2d",
            "UNet 3d",
            "DenseNet121 2d",
            "output padding (not separable)",
        )
    },  # fmt: skip
    "SENet154 2d": (_monai("SENet154", 2, in_channels=1, num_classes=2), (1, 1, 64, 64), [32]),
    "grouped, strided, dilated": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1),
            nn.Conv2d(8, 8, 3, groups=4, dilation=2),
            nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1),
            nn.Conv2d(4, 2, 1),
        ),
        (1, 1, 47, 41),
        [7, 16],
    ),  # fmt: skip
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", NAMED)
def test_predictions_equal_those_rated_row_by_row(name, setting, monkeypatch):
    model, shape, tiles = NAMED[name]
    torch.manual_seed(0)
    splits = analyse(model().eval(), shape)
    device, dtype, _ = SETTINGS[setting]
    modes = [(True, False)] if name == "SENet154 2d" else [(False, False), (True, False), (True, True)]
    shared = {"rates": _rates(setting)}  # the planner's: memos filled by the earlier tiles and modes
    for training, input_grad in modes:
        for tile in tiles:
            with monkeypatch.context() as old:
                old.setattr(steps, "_conv_steps", old_conv_steps)
                old.setattr(steps, "MEMO", False)
                want = predict_splits(splits, shape, dtype, tile, device, training, input_grad,
                                      shared={"rates": _rates(setting)})  # fmt: skip
            for fresh in (False, True):
                if fresh:
                    _fresh_backends(monkeypatch)
                rates = {"rates": _rates(setting)} if fresh else shared
                got = predict_splits(splits, shape, dtype, tile, device, training, input_grad, shared=rates)
                for f in dataclasses.fields(want):
                    assert getattr(got, f.name) == getattr(want, f.name), (f.name, tile, training, input_grad)


# -- one convolution's steps on hypothesis-made rows -----------------------------------------------------


@st.composite
def convolutions(draw):
    """A convolution (or a transposed one) of random channels, groups, kernel, stride and dilation, and
    rows of random boxes: repeated, zero-length extras (no work), boxes smaller than the kernel."""
    nd = draw(st.sampled_from([2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    cin, cout = groups * draw(st.integers(1, 8)), groups * draw(st.integers(1, 8))
    k = draw(st.sampled_from([1, 2, 3, 5]))
    stride, dilation = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 1, 2]))
    cls = {
        (2, False): nn.Conv2d,
        (3, False): nn.Conv3d,
        (2, True): nn.ConvTranspose2d,
        (3, True): nn.ConvTranspose3d,
    }
    pad = draw(st.integers(0, k // 2))
    net = nn.Sequential(
        cls[nd, transposed](cin, cout, k, stride=stride, padding=pad, dilation=dilation, groups=groups)
    )
    r = draw(st.integers(1, 40))
    pool = draw(st.lists(st.tuples(*[st.integers(0 if transposed else 1, 90)] * nd), min_size=1, max_size=8))
    boxes = np.array([draw(st.sampled_from(pool)) for _ in range(r)], dtype=np.int64)
    numel = np.array([draw(st.integers(1, 5000)) for _ in range(r)], dtype=np.int64)
    return net, nd, cin, boxes, numel


@pytest.mark.parametrize("setting", SETTINGS)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(case=convolutions(), grad_in=st.booleans())
def test_conv_steps_equal_those_rated_row_by_row(setting, case, grad_in):
    net, nd, cin, boxes, numel = case
    split = analyse(net.eval(), (1, cin) + (24,) * nd)[-1]
    node = next(n for n in split.order if n in split.ops)
    r = len(numel)
    ones = np.ones((r, nd), dtype=np.int64)
    transposed = isinstance(net[0], nn.ConvTranspose2d | nn.ConvTranspose3d)
    inputs = tuple((i, numel.copy()) for i in split.ops[node].inputs)
    rows = Rows(numel, inputs, ones if transposed else boxes, boxes if transposed else ones,
                np.zeros(r, dtype=bool), np.zeros(r, dtype=bool))  # fmt: skip
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(steps, "_conv_steps", old_conv_steps)
        want = steps._steps_of(split, node, rows, 4, _rates(setting), grad_in)
    for fresh in (True, False):  # torch asked, then the kept answers read back
        with pytest.MonkeyPatch.context() as monkeypatch:
            if fresh:
                _fresh_backends(monkeypatch)
            got = steps._steps_of(split, node, rows, 4, _rates(setting), grad_in)
        for f in steps._FIELDS:
            a, b = getattr(got, f), getattr(want, f)
            assert a.dtype == b.dtype and a.tolist() == b.tolist(), f


def test_backends_are_torchs_for_every_box_and_kept_per_class(monkeypatch):
    """``backends_of`` against the old per-row ``conv_backend`` on boxes that switch torch's kernel
    (small and large, too small for the kernel: None), its store a few classes per signature."""
    _fresh_backends(monkeypatch)
    rates = _rates("cpu-this-machine")
    for nd in (2, 3):
        net = nn.Sequential((nn.Conv2d if nd == 2 else nn.Conv3d)(16, 16, 3, padding=1))
        split = analyse(net.eval(), (1, 16) + (12,) * nd)[-1]
        op = split.ops[next(n for n in split.order if n in split.ops)]
        boxes = [(s,) * nd for s in (1, 2, 3, 5, 34, 50, 200, 100_000)] + [(3,) * (nd - 1) + (1,)]
        want = [old_backend(op, b, 1, 16, 16, False, rates) for b in boxes]
        assert None in want and len(set(want)) > 2
        for _ in range(2):
            assert conv_rates.backends_of(op, [list(b) for b in boxes], 1, 16, 16, False, rates) == want
    want = [old_backend(op, b, 2, 16, 16, False, rates) for b in boxes]  # a batch of 2
    assert conv_rates.backends_of(op, [list(b) for b in boxes], 2, 16, 16, False, rates) == want
    assert all(len(v) <= 32 for v in conv_rates._known.values()) and len(conv_rates._known) == 3


# -- the calibrated table's interpolation and the nearest measurements, many positions at once ----------


@settings(max_examples=200, deadline=None)
@given(
    axes=st.tuples(*[st.lists(st.integers(1, 4096), min_size=1, max_size=4, unique=True)] * 3),
    holes=st.lists(st.booleans(), min_size=64, max_size=64),
    zeros=st.lists(st.booleans(), min_size=64, max_size=64),
    cin=st.integers(1, 5000),
    cout=st.integers(1, 5000),
    positions=st.lists(st.integers(1, 10**7), min_size=0, max_size=30),
)
def test_table_rates_equal_one_at_a_time(axes, holes, zeros, cin, cout, positions):
    """``rate_tables._table_rates`` against ``_table_rate`` per position: grids with holes (corners left out of
    the weights, none left: None) and zero rates, queries on, between and beyond the grid's values."""
    axes = [sorted(a) for a in axes]
    rng = np.random.default_rng(len(positions))
    corners = [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]
    table = {
        k: (0.0 if z else float(rng.uniform(1e8, 1e11))) for k, h, z in zip(corners, holes, zeros) if not h
    }
    positions = positions + axes[2] + [axes[2][0] - 1 or 1, axes[2][-1] + 1]
    got = _table_rates(table, axes, cin, cout, positions)
    assert got == [_table_rate(table, axes, cin, cout, p) for p in positions]
