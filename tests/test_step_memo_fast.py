"""The step memo made cheap predicts what it predicted before, bit for bit: ``step_batch.steps_many``
(a rows' key once per distinct arrays, the parts kept as read-only views), ``row_memo.StepMemo``
(no repacking), ``steps._steps_of`` (kinds and woken rows without per-row Python) and
``untiled.untiled_flops`` (a convolution's flops without its step), each against its copy as it was
at 0effb00 (``tests/_old_step_memo.py``): on random rows of named networks' nodes, on the untiled
flops of named networks, and on whole predictions and memory bounds with the old code put back."""

from __future__ import annotations

import dataclasses
import functools

import _old_steps
import numpy as np
import pytest
import torch
from _old_step_memo import old__steps_of, old_steps_many, old_steps_of, old_untiled_flops
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_grid_empty import OutputPadding
from test_pass_batch import _monai, _unet
from test_step_memo import _calibration, _Dense, _se
from torch import nn

from bigpicture.perf import bound, classes, memory_bound, predict, steps
from bigpicture.perf.devices import get_device, local_cpu
from bigpicture.perf.fusion import fused_rates
from bigpicture.perf.memory_bound import least_memories
from bigpicture.perf.predict import predict_splits
from bigpicture.perf.rates import Rates
from bigpicture.perf.row_memo import Rows
from bigpicture.perf.schedule import analyse
from bigpicture.perf.step_batch import steps_many

SETTINGS = {  # device, dtype, calibration (None: the uncalibrated CPU's nominal rates), compiled
    "cpu-uncalibrated": ("cpu", torch.float32, None, False),
    "cpu-calibrated": ("cpu", torch.float32, "made up", False),
    "cpu-calibrated-compiled": ("cpu", torch.float32, "made up", True),
    "H100-bf16": ("H100-SXM", torch.bfloat16, None, False),
    "H100-bf16-compiled": ("H100-SXM", torch.bfloat16, None, True),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _rates(setting: str) -> Rates:
    device, dtype, calibration, compiled = SETTINGS[setting]
    dev = get_device(device) if device != "cpu" else local_cpu()
    rates = Rates(dev, dtype, _calibration() if calibration else None)
    return fused_rates(rates) if compiled else rates


class _Mixed(nn.Module):
    """Every kind of step: convolutions (grouped, strided, dilated, transposed), norms, pooling
    (max, average), views, in-place and binary ops, a concatenation, padding and interpolation."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.norm, self.act = nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.pool, self.avg = nn.MaxPool2d(2), nn.AvgPool2d(3, stride=1, padding=1)
        self.up, self.c = nn.ConvTranspose2d(4, 3, 2, stride=2), nn.Conv2d(7, 2, 1)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        y = self.act(self.norm(self.b(self.a(x))))
        z = self.avg(self.pool(y)) + torch.sigmoid(self.pool(y))
        u = self.up(self.drop(z))
        u = nn.functional.pad(u, (1, 1, 1, 1))[:, :, 1:-1, 1:-1]
        return self.c(torch.cat([u, y * 2.0], 1))


@functools.cache
def _split(name: str):
    torch.manual_seed(0)
    model, shape = {"mixed": (_Mixed, (1, 2, 24, 20)), "se": (lambda: _se(2), (1, 2, 45, 38)),
                    "dense 3d": (lambda: _Dense(3), (1, 2, 19, 14, 17))}[name]  # fmt: skip
    return analyse(model().eval(), shape)[-1]


def _assert_same(got, want, where) -> None:
    assert got.node is want.node and tuple(got.inputs) == tuple(want.inputs), where
    for f in steps._FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (where, f)


@st.composite
def _calls(draw):
    """(split, calls, known): calls (split, node, rows, grad_in) on a pool of rows whose arrays the
    nodes share (renamed inputs, as ``node_rows.RowShare`` hands them out), copies of them (equal
    numbers, other arrays) and repeats; ``known``: those asked of ``steps_of`` first."""
    split = _split(draw(st.sampled_from(["mixed", "se", "dense 3d"])))
    nodes = [
        n for n in split.order if n in split.ops and split.roles[n] == "spatial" and n is not split.input
    ]
    nd, pool, calls = split.nd, {}, []
    for _ in range(draw(st.integers(1, 40))):
        node = draw(st.sampled_from(nodes))
        inputs = [i for i in split.ops[node].inputs if i in split.extents]
        arrays = pool.get(len(inputs))
        if arrays is None or draw(st.integers(0, 3)) == 0:  # new rows
            r = draw(st.integers(0, 6))
            number = st.one_of(st.integers(0, 40000), st.sampled_from([1, 4096, 8192, 16384, 32768]))
            ints = st.lists(number, min_size=r, max_size=r)  # around PARALLEL_ELEMENTS too
            flags = st.lists(st.booleans(), min_size=r, max_size=r)
            lengths = st.lists(st.integers(1, 70), min_size=r * nd, max_size=r * nd)
            arrays = pool[len(inputs)] = (
                np.array(draw(ints), dtype=np.int64), [np.array(draw(ints), dtype=np.int64) for _ in inputs],
                np.array(draw(lengths), dtype=np.int64).reshape(r, nd),
                np.array(draw(lengths), dtype=np.int64).reshape(r, nd),
                np.array(draw(flags), dtype=bool), np.array(draw(flags), dtype=bool),
            )  # fmt: skip
        elif draw(st.booleans()):  # the same numbers in other arrays
            arrays = tuple(a.copy() if isinstance(a, np.ndarray) else [x.copy() for x in a] for a in arrays)
        numel, ins, padded, extra, outside, copied = arrays
        rows = Rows(numel, tuple(zip(inputs, ins, strict=True)), padded, extra, outside, copied)
        for _ in range(draw(st.integers(1, 2))):
            calls.append((split, node, rows, draw(st.booleans())))
    known = draw(st.lists(st.integers(0, len(calls) - 1), max_size=5, unique=True))
    return split, calls, known


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(case=_calls(), setting=st.sampled_from(list(SETTINGS)), memo=st.booleans())
def test_steps_many_and_steps_of_equal_the_old_ones(case, setting, memo):
    """Every step of a batch and of one call, new (memo on or off) against old, on fresh rates each;
    a batch again on the new memo (read back); every array read-only."""
    _, calls, known = case
    new, old = _rates(setting), _rates(setting)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(steps, "MEMO", memo)
        for k in known:
            _assert_same(steps.steps_of(*calls[k][:3], 4, new, calls[k][3]),
                         old_steps_of(*calls[k][:3], 4, old, calls[k][3], memo=memo), k)  # fmt: skip
        got = steps_many(calls, 4, new)
        want = old_steps_many(calls, 4, old, memo)
        again = steps_many(calls, 4, new)
    for k, (one, other, twice) in enumerate(zip(got, want, again, strict=True)):
        _assert_same(one, other, k)
        _assert_same(twice, other, k)
        split, node, rows, grad_in = calls[k]
        for least in (False, True):  # and each on its own, with no memo at all
            _assert_same(steps._steps_of(split, node, rows, 4, new, grad_in, least),
                         old__steps_of(split, node, rows, 4, old, grad_in, least), (k, least))  # fmt: skip
        assert not any(getattr(one, f).flags.writeable for f in steps._FIELDS)


# -- the untiled flops ------------------------------------------------------------------------------

NETWORKS = {  # name: (model, input shape)
    "se 2d": (lambda: _se(2), (1, 2, 45, 38)),
    "se 3d": (lambda: _se(3), (1, 2, 19, 14, 17)),
    "dense 2d": (lambda: _Dense(2), (1, 2, 45, 38)),
    "mixed (transposed)": (_Mixed, (1, 2, 24, 20)),
    "output padding": (OutputPadding, (1, 1, 9, 11)),
    "UNet 3d (transposed)": (lambda: _unet(3), (1, 1, 16, 16, 24)),
    "SEResNet50 2d": (_monai("SEResNet50", 2, in_channels=1, num_classes=2), (1, 1, 64, 48)),
    "DenseNet121 2d": (
        _monai("DenseNet121", 2, in_channels=1, out_channels=2, init_features=8, growth_rate=4),
        (1, 1, 64, 64),
    ),
}


@pytest.mark.parametrize("name", NETWORKS)
def test_untiled_flops_equal_those_of_the_steps(name):
    """Each pass's, the memo shared by the passes (as ``predict`` keeps it) and fresh, per setting."""
    model, shape = NETWORKS[name]
    torch.manual_seed(0)
    splits = analyse(model().eval(), shape)
    for setting in SETTINGS:
        shared, old_shared = {}, {}
        for split in splits:
            want = old_untiled_flops(split, SETTINGS[setting][1], _rates(setting), old_shared)
            assert old_untiled_flops(split, SETTINGS[setting][1], _rates(setting), {}) == want
            assert predict.untiled_flops(split, SETTINGS[setting][1], _rates(setting), shared) == want
            assert predict.untiled_flops(split, SETTINGS[setting][1], _rates(setting), {}) == want
            assert want > 0


# -- whole predictions and memory bounds, the old code put back -------------------------------------

CASES = {  # name: (model, input shape, tiles)
    "se 2d": (lambda: _se(2), (1, 2, 45, 38), [8, (12, 24), 64]),
    "dense 3d": (lambda: _Dense(3), (1, 2, 19, 14, 17), [4, 8]),
    "mixed": (_Mixed, (1, 2, 24, 20), [4, 8, 24]),
    "SEResNet50 2d": (_monai("SEResNet50", 2, in_channels=1, num_classes=2), (1, 1, 64, 48), [16, 32]),
}


def _old_code(patch) -> None:
    """The step memo, its batch, the steps and the untiled flops as they were."""
    patch.setattr(classes, "steps_many", old_steps_many)
    for module in (steps, classes, bound):
        patch.setattr(module, "steps_of", old_steps_of)
    patch.setattr(memory_bound, "_peaks", _old_steps.old__peaks)  # byte_steps since: its steps_of's
    patch.setattr(predict, "untiled_flops", old_untiled_flops)


@pytest.mark.parametrize("setting", ["cpu-calibrated", "H100-bf16", "cpu-calibrated-compiled"])
@pytest.mark.parametrize("name", CASES)
def test_predictions_and_memory_bounds_equal_the_old_ones(name, setting, monkeypatch):
    """Every candidate predicted and bounded on one ``shared`` (as the planner asks them: the memo
    filled by the earlier ones), new against old: every field of every prediction, every bound."""
    model, shape, tiles = CASES[name]
    device, dtype, *_ = SETTINGS[setting]
    torch.manual_seed(0)
    splits = analyse(model().eval(), shape)
    got: list = []
    for old in (False, True):
        with monkeypatch.context() as patch:
            if old:
                _old_code(patch)
            shared = {"rates": _rates(setting)}
            out = [least_memories(splits, shape, dtype, tiles, device, True, shared)]
            for training, input_grad in ((False, False), (True, False), (True, True)):
                out += [predict_splits(splits, shape, dtype, tile, device, training, input_grad, shared=shared)
                        for tile in tiles]  # fmt: skip
            got.append(out)
    new, old = got
    assert new[0] == old[0]
    for a, b in zip(new[1:], old[1:], strict=True):
        for f in dataclasses.fields(b):
            assert getattr(a, f.name) == getattr(b, f.name), f.name
