"""The grid's geometry a block of rows at a time equals it one row and one ``Box`` at a time.

``engine.intervals`` (batch twins of ``Box.hull``, ``Box.clip``, ``padding.source_box`` and the
rules' ``needs``), ``tiles.Diagonal``'s blocks, ``perf.geometry.BlockGeometry`` and the class keys
``grid.class_grid`` reads from them are compared with the scalar path they replace: ``Box``
methods, ``Diagonal._walk`` (``regions.needs``), ``steps.geometries`` and ``grid._row_key``, and
class grids built the scalar way, over named networks (2D and 3D, strided and transposed
convolutions, upsampling, pooling, every padding mode, crops and concatenations) and random ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_grid_empty import CASES, OutputPadding, counted, every_tile
from test_random_architectures import blueprints, examples
from torch import nn

from bigpicture.engine import intervals
from bigpicture.engine.box import Box
from bigpicture.engine.padding import MODES, source_box
from bigpicture.engine.tiles import Diagonal
from bigpicture.perf import grid
from bigpicture.perf.geometry import BlockGeometry, row_geometries
from bigpicture.perf.grid import layout
from bigpicture.perf.schedule import analyse


@pytest.fixture(autouse=True)
def _uncalibrated(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))


# -- the batch twins of the Box methods -----------------------------------------------------------

coords = st.integers(-12, 40)


@st.composite
def blocks(draw, nd: int, rows: int):
    pairs = draw(st.lists(st.tuples(coords, coords), min_size=nd * rows, max_size=nd * rows))
    lo = np.array([a for a, _ in pairs], dtype=np.int64).reshape(nd, rows)
    hi = np.array([b for _, b in pairs], dtype=np.int64).reshape(nd, rows)
    return lo, hi


def boxes(lo, hi) -> list[Box]:
    return [Box(tuple(lo[:, r].tolist()), tuple(hi[:, r].tolist())) for r in range(lo.shape[1])]


@examples(200)
@given(st.integers(1, 3).flatmap(lambda nd: st.tuples(blocks(nd, 6), blocks(nd, 6))))
def test_hull_is_box_hull_per_row(pair):
    (alo, ahi), (blo, bhi) = pair
    got = boxes(*intervals.hull(alo, ahi, blo, bhi))
    assert got == [a.hull(b) for a, b in zip(boxes(alo, ahi), boxes(blo, bhi), strict=True)]


@examples(200)
@given(st.integers(1, 3).flatmap(lambda nd: st.tuples(blocks(nd, 6), st.lists(st.integers(0, 30), min_size=nd, max_size=nd))))
def test_clip_is_box_clip_per_row(case):
    (lo, hi), shape = case
    assert boxes(*intervals.clip(lo, hi, shape)) == [b.clip(shape) for b in boxes(lo, hi)]


@examples(200)
@given(
    st.integers(1, 3).flatmap(
        lambda nd: st.tuples(blocks(nd, 6), st.lists(st.integers(1, 30), min_size=nd, max_size=nd))
    ),
    st.sampled_from(MODES),
)
def test_source_is_padding_source_box_per_row(case, mode):
    (lo, hi), extent = case
    if mode == "reflect":  # PyTorch reflects by less than the extent
        lo, hi = np.maximum(lo, -min(extent) + 1), np.minimum(hi, 2 * min(extent) - 1)
    got = boxes(*intervals.source(lo, hi, extent, mode))
    assert got == [source_box(b, tuple(extent), mode) for b in boxes(lo, hi)]


# -- networks -------------------------------------------------------------------------------------


class Mixed(nn.Module):
    """Strided convolutions under every padding mode, pooling, normalisation after natively padded
    convolutions, a transposed convolution, upsampling, padding and a skip concatenation."""

    def __init__(self, nd: int) -> None:
        super().__init__()
        conv = (nn.Conv2d, nn.Conv3d)[nd - 2]
        self.nd = nd
        self.a = conv(1, 4, 3, padding=1, padding_mode="reflect")
        self.b = conv(4, 4, 3, stride=2, padding=1)
        self.norm = (nn.BatchNorm2d, nn.BatchNorm3d)[nd - 2](4)
        self.pool = (nn.MaxPool2d, nn.MaxPool3d)[nd - 2](3, stride=2, padding=1)
        self.c = conv(4, 4, 5, padding=2, dilation=1, padding_mode="replicate")
        self.d = conv(4, 4, 3, padding=2, dilation=2, padding_mode="circular")
        self.avg = (nn.AvgPool2d, nn.AvgPool3d)[nd - 2](2)
        self.up = (nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 2](4, 4, 2, stride=2)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.pad = (nn.ReflectionPad2d, nn.ReplicationPad3d)[nd - 2](1)
        self.out = conv(12, 2, 3, padding=0)

    def forward(self, x):
        a = torch.relu(self.a(x))
        b = self.norm(self.b(a))
        c = self.d(self.c(self.pool(b)))
        u = self.up(self.avg(c))
        s = self.upsample(c)
        return self.out(self.pad(torch.cat([b, self.upsample(u), s], 1)))


NETWORKS = {  # name: (model, input shape, tiles)
    "mixed 2d": (lambda: Mixed(2), (1, 1, 520, 392), [16, 24, (8, 40)]),
    "mixed 3d": (lambda: Mixed(3), (1, 1, 136, 72, 104), [8, 16]),
    "output padding": (OutputPadding, (1, 1, 61, 49), [4, 6]),
    **{name: (make, shape, tiles) for name, (make, shape, tiles) in CASES.items()},
}


def splits(name):
    make, shape, tiles = NETWORKS[name]
    torch.manual_seed(0)
    return [s for s in analyse(make().eval(), shape)], shape, tiles


def _scalar_key(split, need, writes, copied, direct, d) -> tuple:
    lengths = tuple(b.length(d) for b in (*writes, *need.values()))
    return lengths, tuple((copied[n][d][1:], direct[n][d][1:]) for n in copied)


def check_rows(split, lay) -> None:
    """Every working row of the diagonal's blocks against the scalar walk, its geometry against
    ``steps.geometries`` and its keys against ``grid._row_key``'s, as equal where theirs are."""
    diagonal = Diagonal(split, lay)
    rows = max(diagonal.working)
    scalar_keys, batch_keys = {}, {}
    for k in range(rows + 2):
        want = diagonal._walk(tuple(min(k, w - 1) for w in diagonal.working))
        assert diagonal.working_row(k) == want, k
        writes, need = want
        gap = any(b.empty for n, b in [*zip(split.sinks, writes), *need.items()] if n is not diagonal._unread)
        assert (k in diagonal.gaps) == gap
        block, r = diagonal.visit(k)
        if gap or not grid.supported(split):
            continue
        geometry = BlockGeometry(split, block)
        copied, direct = row_geometries(split, need, True), row_geometries(split, need, False, None)
        assert geometry.row(r, True) == copied and geometry.row(r, False) == direct, k
        for d in range(split.nd):
            scalar_keys[k, d] = _scalar_key(split, need, writes, copied, direct, d)
            batch_keys[k, d] = geometry.key(r, d)
    for (k, d), key in scalar_keys.items():
        for (m, e), other in scalar_keys.items():
            if d == e:  # rows of one block or of two
                assert (batch_keys[k, d] == batch_keys[m, e]) == (key == other), (k, m, d)


def scalar_class_grid(split, lay, monkeypatch):
    """``class_grid`` the scalar way: no block arrays for the keys, the shifts or the geometry."""
    with monkeypatch.context() as m:
        m.setattr(grid, "supported", lambda split: False)
        m.setattr(grid, "_blocks", lambda row, *js: None)
        grid._DIAGONALS.clear()
        return grid._class_grid(split, lay)


def check_class_grid(split, shape, tile, monkeypatch) -> None:
    lay = layout(split, shape, tile)
    want = scalar_class_grid(split, lay, monkeypatch)
    grid._DIAGONALS.clear()
    got = grid._class_grid(split, lay)
    assert got.separable == want.separable
    assert (got.per_dim, got.lasts) == (want.per_dim, want.lasts)
    if got.separable:
        for j in {j for kinds in got.per_dim for _, j in kinds}:
            for copy in (True, False):
                assert got.geometry(j, copy) == want.geometry(j, copy)
    grid._CLASSES.clear()
    assert counted(split, lay) == every_tile(split, lay)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_blocks_equal_the_scalar_walk_on_named_networks(name, monkeypatch):
    ss, shape, tiles = splits(name)
    for split in ss:
        for tile in tiles:
            check_rows(split, layout(split, shape, tile))
            check_class_grid(split, shape, tile, monkeypatch)


def _check_blueprint(blueprint, monkeypatch) -> None:
    net = blueprint.build().float()
    for split in analyse(net, blueprint.input_shape):
        check_rows(split, layout(split, blueprint.input_shape, blueprint.tile))
        if split.input in split.order:
            check_class_grid(split, blueprint.input_shape, blueprint.tile, monkeypatch)


@examples(30)
@given(blueprints(nd=2, dag=True, max_steps=5))
def test_random_architectures_2d(blueprint):
    with pytest.MonkeyPatch.context() as monkeypatch:
        _check_blueprint(blueprint, monkeypatch)


@examples(10)
@given(blueprints(nd=3, dag=True, max_steps=3))
def test_random_architectures_3d(blueprint):
    with pytest.MonkeyPatch.context() as monkeypatch:
        _check_blueprint(blueprint, monkeypatch)
