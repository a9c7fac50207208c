"""``memory_bound._rows`` (a window's padded box made once per walk) equals the code it replaced
(tests/_old_rows.py: ``steps.geometries`` and ``op.padded_box`` per walk), array for array: over
every pass, candidate tile and walked tile of the memory bounds (``predict.memory_walked``), alone
and grouped, the input copied and not, of named networks (squeeze-and-excitation 2D and 3D, MONAI's,
a transposed convolution, paddings) and random ones (hypothesis)."""

import math

import _old_rows
import numpy as np
import pytest
import torch
from hypothesis import given
from test_least_features import NETS
from test_random_architectures import blueprints, examples

from bigpicture.engine.plan import tile_of
from bigpicture.engine.tiles import layout, working_counts
from bigpicture.perf import memory_bound
from bigpicture.perf.predict import memory_walked
from bigpicture.perf.schedule import analyse, candidates
from bigpicture.perf.walk import grads, tile_at


@pytest.fixture(autouse=True)
def _uncalibrated(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))


def _same(a, b) -> bool:
    arrays = lambda r: (r.numel, *(n for _, n in r.inputs), r.padded, r.extra, r.outside, r.copied)  # noqa: E731
    return [i for i, _ in a.inputs] == [i for i, _ in b.inputs] and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b), strict=True)
    )


def check(splits, shape, tiles) -> int:
    compared = 0
    for k, s in enumerate(splits):
        walks = []
        for tile in tiles:
            lay = layout(s, shape, tile_of(tile, k))
            working = max((working_counts(s, lay, sink) for sink in s.sinks), key=math.prod)
            walks += [tile_at(s, lay, index)[0] for index in memory_walked(lay, working)]
        groups: dict = {}  # as memory_bound._walks groups them: the same nodes computed
        for need in walks:
            groups.setdefault(tuple((n, b.empty) for n, b in need.items()), []).append(need)
        for needs in [*groups.values(), *([n] for n in walks)]:
            numel = memory_bound._numels(needs)
            for copy in (True, False):
                for node in list(grads(s, needs[0], False))[1:]:
                    got = memory_bound._rows(s, node, needs, copy, numel)
                    assert _same(got, _old_rows._rows(s, node, needs, copy)), (k, node, copy)
                    compared += 1
    return compared


@pytest.mark.parametrize("net", list(NETS))
def test_rows_equal_the_old_ones_on_named_networks(net):
    factory, shape = NETS[net]
    torch.manual_seed(0)
    splits = analyse(factory().eval(), shape)
    assert check(splits, shape, candidates(splits, shape)) > 0


@given(blueprints(nd=2, dag=True, max_steps=5))
@examples(30)
def test_rows_equal_the_old_ones_on_random_networks_2d(blueprint):
    model, shape = blueprint.build().float().eval(), (1,) + tuple(blueprint.input_shape[1:])
    splits = analyse(model, shape)
    check(splits, shape, candidates(splits, shape))


@given(blueprints(nd=3, dag=True, max_steps=3))
@examples(10)
def test_rows_equal_the_old_ones_on_random_networks_3d(blueprint):
    model, shape = blueprint.build().float().eval(), (1,) + tuple(blueprint.input_shape[1:])
    splits = analyse(model, shape)
    check(splits, shape, candidates(splits, shape)[-4:])
