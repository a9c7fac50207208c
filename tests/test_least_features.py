"""``least._features`` read off the block arrays (``geometry.BlockGeometry``) equals the scalar
way it replaced (tests/_old_least.py: each op's ``steps.geometries`` on the row's boxes), and so
does the tile ``least.holder`` picks: over every pass, candidate tile and kind of grid index of
named networks (squeeze-and-excitation 2D and 3D, MONAI's, transposed convolutions, paddings) and
random ones (hypothesis), the input copied and not.
"""

import _old_least
import numpy as np
import pytest
import torch
from hypothesis import given
from test_plan_least import NETS as LEAST_NETS
from test_random_architectures import blueprints, examples
from torch import nn

from bigpicture.engine.plan import tile_of
from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose, Pad
from bigpicture.perf import least
from bigpicture.perf.grid import class_grid, layout
from bigpicture.perf.schedule import analyse, candidates


@pytest.fixture(autouse=True)
def _uncalibrated(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))


class Transposed(nn.Module):
    """A strided convolution, a transposed one back up, a reflect padding and a pooled squeeze."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1)
        self.pad = nn.ReflectionPad2d(2)
        self.conv = nn.Conv2d(2, 2, 5)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)

    def forward(self, x):
        y = self.pool(self.conv(self.pad(self.up(torch.relu(self.down(x))))))
        return y * torch.sigmoid(y.mean((2, 3), keepdim=True))


NETS = {**LEAST_NETS, "transposed": (Transposed, (1, 1, 60, 52))}


def same_features(a, b) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x[0], y[0]) and x[0].dtype == y[0].dtype and x[1:] == y[1:] for x, y in zip(a, b)
    )


def check(splits, shape, tiles) -> int:
    """Every kind's features and the holder, new against old; how many grids were compared."""
    compared = 0
    for tile in tiles:
        for k, s in enumerate(splits):
            cg = class_grid(s, layout(s, shape, tile_of(tile, k)))
            if not cg.separable or not cg.diagonal.cover:
                continue
            nodes = list(cg.diagonal.working_row(0)[1])
            for copy in (True, False):
                assert least.holder(s, cg, copy, True) == _old_least.holder(s, cg, copy, True), (tile, k, copy)
                new_ops, old_ops = ops(s, nodes)
                for j in {j for kinds in cg.per_dim for _, j in kinds}:
                    new = least._features(s, cg, j, copy, nodes, new_ops)
                    old = _old_least._features(s, cg, j, copy, nodes, old_ops)
                    assert same_features(new, old), (tile, k, j)
                    assert same_features(new, least._row_features(s, cg, j, copy, nodes, new_ops)), (tile, k, j)
            compared += 1
    return compared


def ops(s, nodes):
    """The ops ``holder`` lists (its loop, verbatim), in the new form (with ``plain``) and the old."""
    listed = []
    for n in nodes:
        if n in s.ops:
            op = s.ops[n]
            rule = ("native" if op.pads_natively(True) else "window") if isinstance(op, Window) else None
            rule = "pad" if isinstance(op, Pad) else rule
            first = op.inputs[0] if op.inputs else None
            aliasing = first is not s.input and first not in nodes
            if rule is not None or aliasing or isinstance(op, ConvTranspose):
                plain = rule in (None, "pad") or type(op).padded_box is Window.padded_box
                listed.append((n, op, rule, aliasing, plain))
    return listed, [o[:4] for o in listed]


@pytest.mark.parametrize("net", list(NETS))
def test_features_equal_the_scalar_ones_on_named_networks(net):
    factory, shape = NETS[net]
    torch.manual_seed(0)
    splits = analyse(factory().eval(), shape)
    assert check(splits, shape, candidates(splits, shape)) > 0


@given(blueprints(nd=2, dag=True, max_steps=5))
@examples(30)
def test_features_equal_the_scalar_ones_on_random_networks_2d(blueprint):
    model, shape = blueprint.build().float().eval(), (1,) + tuple(blueprint.input_shape[1:])
    splits = analyse(model, shape)
    check(splits, shape, candidates(splits, shape)[-4:])


@given(blueprints(nd=3, dag=True, max_steps=3))
@examples(10)
def test_features_equal_the_scalar_ones_on_random_networks_3d(blueprint):
    model, shape = blueprint.build().float().eval(), (1,) + tuple(blueprint.input_shape[1:])
    splits = analyse(model, shape)
    check(splits, shape, candidates(splits, shape)[-3:])


@pytest.mark.parametrize("net", list(NETS))
def test_one_nodes_geometry_is_its_rows(net):
    """``BlockGeometry.node`` (what ``_features`` reads of a step that may alias) is ``row``'s entry."""
    factory, shape = NETS[net]
    torch.manual_seed(0)
    splits, compared = analyse(factory().eval(), shape), 0
    for k, s in enumerate(splits):
        cg = class_grid(s, layout(s, shape, tile_of(candidates(splits, shape)[0], k)))
        if not cg.separable:
            continue
        for j in {j for kinds in cg.per_dim for _, j in kinds}:
            block, r = cg.geometry.block(j)
            for copy in (True, False):
                row = block.row(r, copy)
                assert all(block.node(r, copy, n) == g for n, g in row.items())
                compared += len(row)
    assert compared > 0
