"""Every pass's steps asked at once (``classes.aggregate_passes``, ``step_batch.steps_many``) predict
what each pass predicted on its own (``predict._predict_pass``, each node's steps per pass): every
field of the ``Prediction``, bit for bit, over named networks and random squeeze-and-excitation ones.

The reference is ``predict_splits`` as it was: the passes predicted one after the other, each asking
``steps.steps_of`` node by node (``classes.BATCH = False``), each node's combinations on arrays
(``classes._combos`` then, tests/_old_node_combos.py), then combined.
"""

from __future__ import annotations

import dataclasses

import _old_node_combos
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_grid_empty import OutputPadding
from test_step_memo import _calibration, _Dense, _se, _Squeeze
from torch import nn

from bigpicture.engine.plan import tile_of
from bigpicture.perf import classes, predict, steps
from bigpicture.perf.devices import get_device, local_cpu
from bigpicture.perf.grid import layout
from bigpicture.perf.predict import predict_splits
from bigpicture.perf.rates import Rates
from bigpicture.perf.row_memo import Rows
from bigpicture.perf.schedule import analyse
from bigpicture.perf.stage_cost import with_cuts, with_stage_time
from bigpicture.perf.step_batch import steps_many

SETTINGS = {  # device, dtype, calibration (None: the uncalibrated CPU's nominal rates)
    "cpu-uncalibrated": ("cpu", torch.float32, None),
    "cpu-calibrated": ("cpu", torch.float32, "made up"),
    "H100-bf16": ("H100-SXM", torch.bfloat16, None),
}
MODES = ((False, False), (True, False), (True, True))  # (training, input_grad)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _shared(setting: str) -> dict:
    device, dtype, calibration = SETTINGS[setting]
    dev = get_device(device) if device != "cpu" else local_cpu()
    return {"rates": Rates(dev, dtype, _calibration() if calibration else None)}


def per_pass(splits, shape, dtype, tile, device, training, input_grad, shared) -> predict.Prediction:
    """``predict_splits`` as it was: each pass's ``_predict_pass`` on its own, then combined."""
    dev, rates, on_device, shared = predict._setting(device, dtype, None, shared)
    parts = [
        predict._predict_pass(s, shape, dtype, layout(s, shape, tile_of(tile, k)), dev, rates, training,
                              input_grad, on_device, shared.setdefault(id(s), {}), predict._graph_memo(s, shared))
        for k, s in enumerate(splits)
    ]  # fmt: skip
    whole = parts[0] if len(parts) == 1 else predict._combine(parts)
    whole = with_stage_time(whole, splits[-1], dtype, rates, training)
    return with_cuts(whole, splits, shape, tile, dtype, rates, training)


def assert_batched_as_per_pass(splits, shape, tiles, setting: str, monkeypatch, modes=MODES) -> None:
    """Each tile and mode predicted batched (one ``shared`` for all, as the planner's, and a fresh one)
    against per pass (fresh rates, no step memo): every field equal."""
    device, dtype, _ = SETTINGS[setting]
    planner = _shared(setting)
    for training, input_grad in modes:
        for tile in tiles:
            with monkeypatch.context() as old:
                old.setattr(classes, "BATCH", False)
                old.setattr(steps, "MEMO", False)
                want = per_pass(splits, shape, dtype, tile, device, training, input_grad, _shared(setting))
            for shared in (planner, _shared(setting)):
                got = predict_splits(splits, shape, dtype, tile, device, training, input_grad, shared=shared)
                for f in dataclasses.fields(want):
                    assert getattr(got, f.name) == getattr(want, f.name), (f.name, tile, training, input_grad)


def _monai(name: str, nd: int, **kw):
    from monai.networks import nets

    return lambda: getattr(nets, name)(spatial_dims=nd, **kw)


CASES = {  # name: (model, input shape, tiles)
    "se 2d": (lambda: _se(2), (1, 2, 45, 38), [8, (12, 24), 64]),
    "se 3d": (lambda: _se(3), (1, 2, 19, 14, 17), [4, 8, 24]),
    "dense 2d": (lambda: _Dense(2), (1, 2, 45, 38), [8, 16]),
    "output padding (not separable)": (OutputPadding, (1, 1, 9, 11), [4, 6]),
    "output padding, squeezed": (
        lambda: nn.Sequential(OutputPadding(), _Squeeze(2, 2), nn.Conv2d(2, 2, 3)),
        (1, 1, 13, 11),
        [4, 6],
    ),
    "SEResNet50 2d": (_monai("SEResNet50", 2, in_channels=1, num_classes=2), (1, 1, 64, 48), [32]),
    "SEResNet50 3d": (_monai("SEResNet50", 3, in_channels=1, num_classes=2), (1, 1, 32, 32, 24), [16]),
    "UNet 2d": (lambda: _unet(2), (1, 1, 32, 40), [8, 16]),
    "UNet 3d": (lambda: _unet(3), (1, 1, 16, 16, 24), [8]),
    "DenseNet121 2d": (
        _monai("DenseNet121", 2, in_channels=1, out_channels=2, init_features=8, growth_rate=4),
        (1, 1, 64, 64),
        [16, 32],
    ),
}


def _unet(nd: int):
    from monai.networks.nets import UNet

    return UNet(nd, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", CASES)
def test_passes_batched_predict_as_each_pass_on_its_own(name, setting, monkeypatch):
    model, shape, tiles = CASES[name]
    torch.manual_seed(0)
    splits = analyse(model().eval(), shape)
    if name.startswith(("se ", "SE")):
        assert len(splits) > 1
    assert_batched_as_per_pass(splits, shape, tiles, setting, monkeypatch)


def test_senet154_batched_predicts_as_each_pass_on_its_own(monkeypatch):
    """51 passes (the census's slow rows): one tile, training, on a GPU."""
    shape = (1, 1, 64, 64)
    splits = analyse(_monai("SENet154", 2, in_channels=1, num_classes=2)().eval(), shape)
    assert len(splits) == 51
    assert_batched_as_per_pass(splits, shape, [32], "H100-bf16", monkeypatch, [(True, False)])


# -- random squeeze-and-excitation networks --------------------------------------------------------


@st.composite
def se_networks(draw, nd: int):
    """A stack of convolutions (kernel, stride, padding, dilation), norms, activations and
    squeeze-and-excitation gates (each ends a pass), on a small input, and a tile."""
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if nd == 2 else (nn.Conv3d, nn.BatchNorm3d)
    extent = draw(st.integers(12, 40 if nd == 2 else 14))
    shape = (1, 2) + tuple(extent + draw(st.integers(0, 5)) for _ in range(nd))
    layers, c, size = [], 2, min(shape[2:])
    for _ in range(draw(st.integers(2, 7))):
        k = draw(st.sampled_from([1, 3, 5]))
        stride = draw(st.sampled_from([1, 1, 2])) if size >= 8 else 1
        padding, dilation = draw(st.integers(0, k // 2)), draw(st.sampled_from([1, 1, 2])) if k > 1 else 1
        if size + 2 * padding - dilation * (k - 1) < 2:
            padding, dilation = k // 2, 1
        out = draw(st.integers(1, 4))
        layers.append(conv(c, out, k, stride=stride, padding=padding, dilation=dilation))
        size, c = (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1, out
        if draw(st.booleans()):
            layers.append(norm(c))
        layers.append(draw(st.sampled_from([nn.ReLU, nn.Sigmoid, nn.Identity]))())
        if draw(st.booleans()):
            layers.append(_Squeeze(c, nd))
    layers.append(_Squeeze(c, nd))  # at least two passes
    tiles = [draw(st.integers(3, max(shape[2:]) + 2)) for _ in range(2)]
    return nn.Sequential(*layers), shape, tiles


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(case=st.one_of(se_networks(2), se_networks(3)), setting=st.sampled_from(list(SETTINGS)),
       mode=st.sampled_from(MODES))  # fmt: skip
def test_random_se_networks_batched_predict_as_each_pass_on_its_own(case, setting, mode):
    model, shape, tiles = case
    torch.manual_seed(0)
    splits = analyse(model.eval(), shape)
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert_batched_as_per_pass(splits, shape, tiles, setting, monkeypatch, [mode])


# -- the steps, asked at once or one (node, rows) at a time ----------------------------------------


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("memo", [True, False])
def test_steps_many_equal_steps_of_each(setting, memo, monkeypatch):
    """Rows of one node repeated, shared and distinct across calls, some known to the memo first."""
    monkeypatch.setattr(steps, "MEMO", memo)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.AvgPool2d(3, padding=1), nn.Conv2d(4, 2, 3))  # fmt: skip
    split = analyse(net.eval(), (1, 2, 32, 32))[-1]
    rng = np.random.default_rng(0)

    def rows(r: int, inputs) -> Rows:
        numel = rng.integers(1, 400, r)
        return Rows(numel, tuple((i, rng.integers(1, 500, r)) for i in inputs), rng.integers(1, 30, (r, 2)),
                    np.ones((r, 2), dtype=np.int64), rng.integers(0, 2, r).astype(bool),
                    rng.integers(0, 2, r).astype(bool))  # fmt: skip

    shared = _shared(setting)["rates"]
    calls = []
    for node in (n for n in split.order if n in split.ops):
        inputs = [i for i in split.ops[node].inputs if i in split.ops or i is split.input]
        made = [rows(r, inputs) for r in (1, 3, 7)]
        for r in (*made, made[1], made[0]):
            for grad_in in (False, True):
                calls.append((split, node, r, grad_in))
    for split_, node, r, grad_in in calls[::5]:  # known before
        steps.steps_of(split_, node, r, 4, shared, grad_in)
    got = steps_many(calls, 4, shared)
    fresh = _shared(setting)["rates"]
    for (split_, node, r, grad_in), one in zip(calls, got, strict=True):
        monkeypatch.setattr(steps, "MEMO", False)
        want = steps.steps_of(split_, node, r, 4, fresh, grad_in)
        assert one.node is want.node and one.inputs == want.inputs
        for f in steps._FIELDS:
            a, b = getattr(one, f), getattr(want, f)
            assert a.dtype == b.dtype and np.array_equal(a, b), (node, f)


# -- a node's combinations on Python numbers (a small grid) or on arrays --------------------------


@st.composite
def node_geometries(draw):
    """``_node_rows``' per-dimension features and lengths: few distinct values, so rows repeat."""
    nd, boxes = draw(st.integers(1, 3)), ["node", *range(draw(st.integers(0, 2)))]
    per_dim, lengths = [], []
    for _ in range(nd):
        count = draw(st.integers(1, 4))
        flags = [(None, draw(st.booleans()), draw(st.booleans()), 0) for _ in range(count)]
        tiles = draw(st.lists(st.integers(1, 10**4), min_size=count, max_size=count))  # sums exact in float64
        per_dim.append((tuple(range(count)), list(range(count)), tiles, flags))
        lengths.append([draw(st.lists(st.integers(0, 3), min_size=len(boxes) + 2, max_size=len(boxes) + 2))
                        for _ in range(count)])  # fmt: skip
    return per_dim, lengths, boxes, draw(st.booleans())


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(node_geometries())
def test_small_combinations_equal_those_on_arrays(geometry):
    got, want = _old_node_combos._small_combos(*geometry), _old_node_combos._combos(*geometry)
    for a, b in zip(
        (*got[0].__dict__.values(), *got[1:]), (*want[0].__dict__.values(), *want[1:]), strict=True
    ):
        if isinstance(a, tuple):  # the inputs' (node, positions)
            assert [i for i, _ in a] == [i for i, _ in b]
            a, b = np.stack([n for _, n in a]) if a else a, np.stack([n for _, n in b]) if b else b
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b), geometry
