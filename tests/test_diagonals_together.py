"""The diagonals of several passes walked at once (``engine/diagonals.py``, ``intervals.needs_many``)
give every block each diagonal walks alone, exactly: the same nodes, places, boxes (empty ones
included, with their coordinates), dtypes and gaps.

Over named networks (MONAI SEResNet50 and UNet: passes that are nested prefixes of one graph; the
single-pass ones of ``test_grid_fast``: odd strides, transposed convolutions, output padding, empty
boxes, 2D and 3D) walked together per network with one or two tiles per pass, in both orders, and
over random networks (hypothesis).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_grid_fast import CASES, _same_block
from test_random_architectures import blueprints, examples

from bigpicture.engine import diagonals, intervals
from bigpicture.engine.tiles import Diagonal
from bigpicture.perf import grid
from bigpicture.perf.grid import layout
from bigpicture.perf.schedule import analyse


def check_together(splits, shape, tiles) -> None:
    """Every pass at every tile (and in reverse order) walked in one batch, each of its blocks
    against the same diagonal walked alone; ``walk_together``'s batches too."""
    pairs = [(s, layout(s, shape, t)) for t in tiles for s in splits]
    for order in (pairs, pairs[::-1]):
        together = [Diagonal(s, lay) for s, lay in order]
        diagonals._walk([(d, d.starts(0)) for d in together])
        assert all(d._blocks for d in together)
        for d, (s, lay) in zip(together, order, strict=True):
            alone = Diagonal(s, lay)
            alone.block(0)
            assert list(d._blocks) == list(alone._blocks)
            for start, block in d._blocks.items():
                _same_block(block, alone._blocks[start])
                assert block.place is d._blocks[0].place  # one walk's blocks share their places
    batched = [Diagonal(s, lay) for s, lay in pairs]
    diagonals.walk_together(batched)
    for d, (s, lay) in zip(batched, pairs, strict=True):
        alone = Diagonal(s, lay)
        for k in range(max(d.working)):
            _same_block(d.block(k), alone.block(k))


def check_needs(split, shape, tile) -> None:
    """``needs_many`` of one split is ``needs``, node for node (absent nodes: not spatial)."""
    d = Diagonal(split, layout(split, shape, tile))
    rows, writes = d.rows_of(d.starts(0))
    want = intervals.needs(split, dict(zip(split.sinks, writes, strict=True)), rows)
    got = intervals.needs_many([split], [dict(zip(split.sinks, writes, strict=True))], [rows])
    zero = np.zeros((split.nd, rows), dtype=np.int64)
    for node, (lo, hi) in want.items():
        glo, ghi = got.get(node, (zero, zero))
        assert np.array_equal(glo, lo) and np.array_equal(ghi, hi), node


@pytest.mark.parametrize("name", sorted(CASES))
def test_walked_together_equals_walked_alone_on_named_networks(name):
    make, shape, tiles = CASES[name]
    torch.manual_seed(0)
    splits = analyse(make().eval(), shape)
    check_together(splits, shape, tiles[:2])
    for split in splits:
        for tile in tiles:
            check_needs(split, shape, tile)


def test_passes_of_other_graphs_are_walked_alone():
    make, shape, tiles = CASES["SEResNet50 2d"]
    torch.manual_seed(0)
    ours, other = analyse(make().eval(), shape), analyse(make().eval(), shape)
    assert intervals.needs_many([ours[0], other[1]], [{}, {}], [1, 1]) is None
    together = [
        Diagonal(ours[0], layout(ours[0], shape, 32)),
        Diagonal(other[1], layout(other[1], shape, 32)),
    ]
    diagonals.walk_together(together)
    assert not any(d._blocks for d in together)  # left to walk alone, on first use


def _check_blueprint(blueprint, scale: int, tiles) -> None:
    net = blueprint.build().float()
    shape = blueprint.input_shape
    for size in (shape, shape[:2] + tuple(n * scale for n in shape[2:])):
        try:
            splits = analyse(net, size)
        except Exception:  # noqa: BLE001  (a network whose ops fit its own input only)
            continue
        check_together(splits, size, [blueprint.tile, *tiles])


@examples(25)
@given(blueprints(nd=2, dag=True, max_steps=5), st.integers(2, 3), st.sampled_from([[], [3], [(2, 5)]]))
def test_random_architectures_2d(blueprint, scale, tiles):
    _check_blueprint(blueprint, scale, tiles)


@examples(8)
@given(blueprints(nd=3, dag=True, max_steps=3), st.integers(2, 3), st.sampled_from([[], [2]]))
def test_random_architectures_3d(blueprint, scale, tiles):
    _check_blueprint(blueprint, scale, tiles)


@pytest.mark.parametrize("name", ["SEResNet50 2d", "UNet 3d", "output padding", "odd strides 2d"])
def test_class_grids_equal_class_grid_one_pass_at_a_time(name):
    make, shape, tiles = CASES[name]
    torch.manual_seed(0)
    splits = analyse(make().eval(), shape)
    for tile in tiles:
        lays = [layout(s, shape, tile) for s in splits]
        grid._CLASSES.clear(), grid._DIAGONALS.clear()
        want = [grid.class_grid(s, lay) for s, lay in zip(splits, lays, strict=True)]
        grid._CLASSES.clear(), grid._DIAGONALS.clear()
        got = grid.class_grids(splits, lays)
        grid._CLASSES.clear(), grid._DIAGONALS.clear()
        for a, b in zip(got, want, strict=True):
            assert (a.separable, a.per_dim, a.lasts, a.listed) == (b.separable, b.per_dim, b.lasts, b.listed)
            assert a.diagonal.gaps == b.diagonal.gaps
            assert a.materialise() == b.materialise()
