"""``regions.needs`` walking a reverse plan kept per split (``regions._reverse``: each node's spatial
users and its place among their inputs) equals the walk it replaced (tests/_old_regions.py), box for
box: over every pass of named networks (DenseNet's many-input concatenations, squeeze-and-excitation
passes, transposed convolutions, paddings; 2D and 3D), each candidate tile at the grid's corners,
middle and edges, and random networks (hypothesis); also with sinks written empty boxes.
"""

import itertools

import _old_regions
import pytest
import torch
from hypothesis import given
from test_least_features import NETS as FEATURE_NETS
from test_random_architectures import blueprints, examples

from bigpicture.engine import regions
from bigpicture.engine.box import Box
from bigpicture.engine.plan import tile_of
from bigpicture.engine.tiles import layout
from bigpicture.perf.schedule import analyse, candidates
from bigpicture.perf.walk import tile_at


def densenet():
    from monai.networks.nets import DenseNet

    return DenseNet(spatial_dims=2, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                    block_config=(3, 4))  # fmt: skip


NETS = {**FEATURE_NETS, "DenseNet 2d": (densenet, (1, 1, 64, 56))}


def same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(type(a[n]) is type(b[n]) and a[n] == b[n] for n in a)


def check(splits, shape, tiles) -> int:
    """New against old needs at a few grid indices of every tile and pass; how many compared."""
    compared = 0
    for tile in tiles:
        for k, s in enumerate(splits):
            lay = layout(s, shape, tile_of(tile, k))
            counts = lay.grid
            picks = [sorted({0, 1, c // 2, c - 1} & set(range(c))) for c in counts]
            for index in itertools.product(*picks):
                _, writes = tile_at(s, lay, index)
                writes = dict(zip(s.sinks, writes, strict=True))
                assert same(regions.needs(s, writes), _old_regions.needs(s, writes)), (tile, k, index)
                compared += 1
            empty = {n: Box((0,) * s.nd, (0,) * s.nd) for n in s.sinks}
            assert same(regions.needs(s, empty), _old_regions.needs(s, empty))
            assert same(regions.needs(s, {}), _old_regions.needs(s, {}))
    return compared


@pytest.mark.parametrize("net", list(NETS))
def test_needs_equal_the_old_walk_on_named_networks(net):
    factory, shape = NETS[net]
    torch.manual_seed(0)
    splits = analyse(factory().eval(), shape)
    assert check(splits, shape, candidates(splits, shape)) > 0
    assert regions.receptive_field(splits[-1]) == _old_regions.receptive_field(splits[-1])


@given(blueprints(nd=2, dag=True, max_steps=6))
@examples(40)
def test_needs_equal_the_old_walk_on_random_networks_2d(blueprint):
    model, shape = blueprint.build().float().eval(), (1,) + tuple(blueprint.input_shape[1:])
    splits = analyse(model, shape)
    check(splits, shape, candidates(splits, shape)[-3:])


@given(blueprints(nd=3, dag=True, max_steps=3))
@examples(10)
def test_needs_equal_the_old_walk_on_random_networks_3d(blueprint):
    model, shape = blueprint.build().float().eval(), (1,) + tuple(blueprint.input_shape[1:])
    splits = analyse(model, shape)
    check(splits, shape, candidates(splits, shape)[-2:])
