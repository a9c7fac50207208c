"""The steps built faster give what they gave before, bit for bit (tests/_old_steps.py, as at 93d0848):

    bytes_only.byte_steps   a node's byte counts and flags, no seconds: those of ``steps._steps_of``
    memory_bound._peaks     its walks' peaks from ``byte_steps``: those from ``steps.steps_of``

on random rows of named networks' nodes (every kind of step, every rates setting: hypothesis) and on
the memory bounds of named networks (squeeze-and-excitation 2D and 3D, MONAI's SEResNet50 and
DenseNet121, a transposed convolution, paddings) and random ones, old code put back."""

from __future__ import annotations

import _old_steps
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_least_features import NETS as LEAST_NETS
from test_random_architectures import blueprints, examples
from test_step_memo_fast import CASES, SETTINGS, _calls, _rates

from bigpicture.perf import memory_bound, steps
from bigpicture.perf.bytes_only import byte_steps, bytes_only
from bigpicture.perf.memory_bound import least_memories
from bigpicture.perf.schedule import analyse, candidates

BYTES = ("out", "temp", "padded", "saved_extra", "aliases", "keeps_padded", "saves_inputs", "saves_output")


@pytest.fixture(autouse=True)
def _uncalibrated(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))


def _assert_same(got, want, fields, where) -> None:
    assert got.node is want.node and tuple(got.inputs) == tuple(want.inputs), where
    for f in fields:
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (where, f)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(case=_calls(), setting=st.sampled_from(list(SETTINGS)), counting=st.booleans())
def test_byte_steps_equal_the_old_steps(case, setting, counting):
    """Every byte count and flag of every call, against the old ``_steps_of`` with the same rates
    (real or byte-counting ones)."""
    _, calls, _ = case
    new, old = _rates(setting), _rates(setting)
    if counting:
        new, old = bytes_only(new), bytes_only(old)
    for k, (split, node, rows, grad_in) in enumerate(calls):
        want = _old_steps.old__steps_of(split, node, rows, 4, old, grad_in)
        _assert_same(byte_steps(split, node, rows, 4, new), want, BYTES, k)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(case=_calls(), setting=st.sampled_from(list(SETTINGS)))
def test_byte_steps_equal_the_live_steps(case, setting):
    """``byte_steps`` restates ``steps._steps_of``'s byte rules: against the live ``_steps_of`` too, so a
    change to one that the other does not follow fails here."""
    _, calls, _ = case
    new, live = _rates(setting), _rates(setting)
    for k, (split, node, rows, grad_in) in enumerate(calls):
        _assert_same(byte_steps(split, node, rows, 4, new), steps._steps_of(split, node, rows, 4, live, grad_in),
                     BYTES, k)  # fmt: skip


def _bounds(splits, shape, tiles, old: bool, monkeypatch) -> list:
    """``least_memories`` of ``tiles`` on each device, training or not, every pass and the last one
    alone; with ``old``, ``memory_bound._peaks`` as it was."""
    out = []
    with monkeypatch.context() as patch:
        if old:
            patch.setattr(memory_bound, "_peaks", _old_steps.old__peaks)
        for device, dtype in (("cpu", torch.float32), ("H100-SXM", torch.bfloat16)):
            for training in (True, False):
                shared: dict = {}
                for passes in (None, [len(splits) - 1]):
                    out.append(least_memories(splits, shape, dtype, tiles, device, training, shared, passes))
    return out


NAMED = {**{k: (v[0], v[1]) for k, v in CASES.items()}, **LEAST_NETS}


@pytest.mark.parametrize("name", NAMED)
def test_memory_bounds_equal_the_old_ones(name, monkeypatch):
    model, shape = NAMED[name]
    torch.manual_seed(0)
    splits = analyse(model().eval(), shape)
    tiles = candidates(splits, shape)
    assert _bounds(splits, shape, tiles, False, monkeypatch) == _bounds(
        splits, shape, tiles, True, monkeypatch
    )


@given(blueprints(nd=2, dag=True, max_steps=5))
@examples(20)
def test_memory_bounds_equal_the_old_ones_on_random_networks_2d(blueprint):
    model, shape = blueprint.build().float().eval(), (1,) + tuple(blueprint.input_shape[1:])
    splits = analyse(model, shape)
    tiles = candidates(splits, shape)
    with pytest.MonkeyPatch.context() as patch:
        assert _bounds(splits, shape, tiles, False, patch) == _bounds(splits, shape, tiles, True, patch)


@given(blueprints(nd=3, dag=True, max_steps=3))
@examples(8)
def test_memory_bounds_equal_the_old_ones_on_random_networks_3d(blueprint):
    model, shape = blueprint.build().float().eval(), (1,) + tuple(blueprint.input_shape[1:])
    splits = analyse(model, shape)
    tiles = candidates(splits, shape)[-4:]
    with pytest.MonkeyPatch.context() as patch:
        assert _bounds(splits, shape, tiles, False, patch) == _bounds(splits, shape, tiles, True, patch)
