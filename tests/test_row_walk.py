"""``walk.row_peaks`` (each structure walked once on names, its byte counts summed on arrays of every
step: ``row_walk``; thousands of rows step by step) equals the walk it replaced (tests/_old_walk.py:
``peaks`` step by step on each chunk of rows), array for array: on every call the planner makes of
it (the class peaks of every candidate's prediction, the memory bounds) for named networks
(squeeze-and-excitation 2D and 3D, MONAI's, transposed convolutions, paddings, long grids) and
random ones (hypothesis), and on random steps (hypothesis: any flags, aliases, repeated inputs,
byte counts); each both ways (``row_walk`` and step by step) and in small chunks."""

from __future__ import annotations

import _old_walk
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_least_features import NETS
from test_plan_search import LONG
from test_random_architectures import blueprints, examples

from bigpicture.perf import class_sums, memory_bound, walk
from bigpicture.perf.memory_bound import least_memories
from bigpicture.perf.predict import predict_splits
from bigpicture.perf.schedule import analyse, candidates
from bigpicture.perf.steps import Step


@pytest.fixture(autouse=True)
def _uncalibrated(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))


def old(split, steps, sizes, terms, grad, training, input_copy, index=None):
    """The old walk on the same arguments: its sizes per row, read off each step's entries."""
    index = index or [slice(None)] * len(steps)
    full = {split.input: sizes[split.input], **{s.node: sizes[s.node][p] for s, p in zip(steps, index)}}
    return _old_walk.row_peaks(split, steps, full, terms, grad, training, input_copy, index)


WAYS = {"as planned": {}, "step by step": {"WIDE": -1}, "on names in chunks": {"WIDE": 1 << 30, "CHUNK": 64},
        "step by step in chunks": {"WIDE": -1, "CHUNK_ROWS": 3}}  # fmt: skip


def compare(monkeypatch, way: str) -> list:
    """Every ``row_peaks`` call checked against the old walk, ``way``; the calls made."""
    calls = []
    for name, value in WAYS[way].items():
        monkeypatch.setattr(walk, name, value)

    def checked(*args, **kwargs):
        got, want = walk.row_peaks(*args, **kwargs), old(*args, **kwargs)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype == np.int64 and np.array_equal(g, w), (g, w)
        calls.append(len(got[0]))
        return got

    monkeypatch.setattr(class_sums, "row_peaks", checked)
    monkeypatch.setattr(memory_bound, "row_peaks", checked)
    return calls


def plan(splits, shape, tiles, device, dtype, training) -> None:
    """What the planner walks: every tile's prediction and the memory bounds of all of them."""
    for tile in tiles:
        predict_splits(splits, shape, dtype, tile, device, training, shared={})
    least_memories(splits, shape, dtype, tiles, device, training, {})


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("setting", [("cpu", torch.float32, True), ("H100-SXM", torch.bfloat16, True),
                                     ("cpu", torch.float32, False)], ids=["cpu", "H100", "inference"])  # fmt: skip
@pytest.mark.parametrize("net", list(NETS))
def test_row_peaks_equal_the_old_walk_on_named_networks(net, setting, way, monkeypatch):
    factory, shape = NETS[net]
    torch.manual_seed(0)
    splits = analyse(factory().eval(), shape)
    calls = compare(monkeypatch, way)
    plan(splits, shape, candidates(splits, shape), *setting)
    assert calls


@pytest.mark.parametrize("way", ["as planned", "step by step"])
@pytest.mark.parametrize("name", list(LONG))
def test_row_peaks_equal_the_old_walk_on_long_grids(name, way, monkeypatch):
    factory, shape, tiles = LONG[name]
    torch.manual_seed(0)
    splits = analyse(factory().eval(), shape)
    calls = compare(monkeypatch, way)
    plan(splits, shape, tiles, "cpu", torch.float32, True)
    assert max(calls) > 1


@given(blueprints(nd=2, dag=True, max_steps=5), st.sampled_from(list(WAYS)), st.booleans())
@examples(30)
def test_row_peaks_equal_the_old_walk_on_random_networks(blueprint, way, training):
    with pytest.MonkeyPatch.context() as monkeypatch:
        model, shape = blueprint.build().float().eval(), (1,) + tuple(blueprint.input_shape[1:])
        splits = analyse(model, shape)
        compare(monkeypatch, way)
        plan(splits, shape, candidates(splits, shape)[-6:], "cpu", torch.float32, training)


class _Node:
    """A node of a random walk: its spatial inputs as fx nodes have them."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


class _Split:
    def __init__(self, x, sinks) -> None:
        self.input, self.sinks = x, sinks


@st.composite
def walks(draw):
    """A random walk's arguments: steps reading earlier values (the image included, some twice),
    any flags per entry (alike in most steps), byte counts, sinks, gradients, per-row entries."""
    count, rows = draw(st.integers(0, 14)), draw(st.integers(1, 40))
    x = _Node("x")
    nodes = [_Node(f"n{t}") for t in range(count)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    steps, index, sizes = [], [], {x: rng.integers(0, 1000, rows)}
    for t, node in enumerate(nodes):
        earlier = [x, *nodes[:t]]
        inputs = tuple(earlier[i] for i in rng.integers(0, len(earlier), int(rng.integers(1, 4))))
        distinct = int(rng.integers(1, 6))
        flags = rng.integers(0, 2, (distinct, 4)).astype(bool)
        if rng.uniform() < 0.7:
            flags[:] = flags[0]
        numbers = [rng.integers(0, 1000, distinct) * (rng.uniform() < 0.6) for _ in range(4)]
        steps.append(Step(node, inputs, numbers[0], temp=numbers[1], padded=numbers[2], saved_extra=numbers[3],
                          aliases=flags[:, 0], keeps_padded=flags[:, 1], saves_inputs=flags[:, 2],
                          saves_output=flags[:, 3]))  # fmt: skip
        sizes[node] = rng.integers(0, 1000, distinct)
        index.append(rng.integers(0, distinct, rows))
    sinks = [nodes[i] for i in sorted(set(rng.integers(0, count, int(rng.integers(1, 3))).tolist()))] if count \
        else [x]  # fmt: skip
    grad = {x: draw(st.booleans()), **{n: bool(rng.uniform() < 0.8) for n in nodes}}
    terms = [rng.integers(0, 1000, rows) for _ in sinks]
    return _Split(x, sinks), steps, sizes, terms, grad, draw(st.booleans()), draw(st.booleans()), index


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(walks(), st.sampled_from(list(WAYS)))
def test_row_peaks_equal_the_old_walk_on_random_steps(args, way):
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, value in WAYS[way].items():
            monkeypatch.setattr(walk, name, value)
        got, want = walk.row_peaks(*args), old(*args)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == np.int64 and np.array_equal(g, w)
