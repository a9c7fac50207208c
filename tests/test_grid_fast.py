"""The grid's fast paths give what the slow ones they replace gave, exactly.

``grid._periodic`` (the period of the interior of a long grid, the rows it visits), ``_shifted``
(in integers per distinct stride: ``perf/strides.py``) and ``Diagonal``'s blocks (the two border
blocks walked at once) against verbatim copies of the code before them (``reference_grid.py``):
the same blocks, periods, keys, class grids, the bound's tables, and the same rows counted as
walked (``Diagonal.gaps``), over named networks (MONAI SEResNet50, UNet, DenseNet121; transposed
convolutions, odd strides, 2D and 3D, grids long enough to be periodic, grids with empty boxes)
and random ones, on grids scaled up so that their interior repeats.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import reference_grid as ref
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_batch_geometry import NETWORKS
from test_random_architectures import blueprints, examples
from torch import nn

from bigpicture.engine.tiles import Diagonal, Layout
from bigpicture.perf import bound, grid
from bigpicture.perf.grid import layout
from bigpicture.perf.schedule import analyse
from bigpicture.perf.strides import strides_of


@pytest.fixture(autouse=True)
def _uncalibrated(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))


class OddStrides(nn.Module):
    """Strides of 3 down and up, and a stride-2 transposed convolution: tiles whose period is not 1."""

    def __init__(self, nd: int) -> None:
        super().__init__()
        conv, up = (nn.Conv2d, nn.Conv3d)[nd - 2], (nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 2]
        self.a = conv(1, 2, 3, stride=3, padding=1)
        self.b = conv(2, 2, 5, padding=2, padding_mode="reflect")
        self.up = up(2, 2, 3, stride=3)
        self.c = conv(2, 2, 3, stride=2, padding=1)
        self.up2 = up(2, 1, 2, stride=2)

    def forward(self, x):
        return self.up2(self.c(torch.relu(self.up(self.b(self.a(x))))))


def _monai(name, *args, **kwargs):
    def make():
        from monai.networks import nets

        return getattr(nets, name)(*args, **kwargs)

    return make


LONG = {  # name: (model, input shape, tiles): grids of more than 8 tiles, their interior periodic
    "odd strides 2d": (lambda: OddStrides(2), (1, 1, 250, 140), [6, 10, (12, 8)]),
    "odd strides 3d": (lambda: OddStrides(3), (1, 1, 66, 60, 40), [4, (6, 10, 4)]),
    "mixed 2d long": (NETWORKS["mixed 2d"][0], (1, 1, 600, 392), [16, (8, 24)]),
    "SEResNet50 2d": (
        _monai("SEResNet50", spatial_dims=2, in_channels=1, num_classes=2), (1, 1, 608, 352), [32, 64, (64, 32)]
    ),
    "UNet 3d": (
        _monai("UNet", 3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1), (1, 1, 48, 40, 44), [4, 8]
    ),
    "DenseNet121 2d": (
        _monai("DenseNet121", spatial_dims=2, in_channels=1, out_channels=2), (1, 1, 352, 320), [32, (32, 64)]
    ),
}
CASES = {**NETWORKS, **LONG}


def _lengths(row, d):
    """A key of row j along d: every box's length (as the bound's tables key them)."""

    def key(j):
        writes, need = row(j)
        return tuple(b.length(d) for b in (*writes, *need.values()))

    return key


def _same_block(got, want) -> None:
    assert (got.start, got.sinks, got.nodes, got.place) == (want.start, want.sinks, want.nodes, want.place)
    for a, b in ((got.lo, want.lo), (got.hi, want.hi), (got.gaps, want.gaps)):
        assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all()


def check_blocks(split, lay) -> None:
    """Every block the fast diagonal walks, in every order asked, equals the block walked alone."""
    new, old = Diagonal(split, lay), ref.OldDiagonal(split, lay)
    rows = max(new.working)
    for k in [*range(rows - 1, -1, -1), *range(rows)]:  # from the far border first, then from 0
        _same_block(new.block(k), old.block(k))
    fresh = Diagonal(split, lay)
    for k in range(rows):
        _same_block(fresh.block(k), old.block(k))


def check_period(split, lay) -> None:
    """The integer period and shifts against the ``Fraction`` ones, for every tile and period."""
    strides = strides_of(split)
    for d in range(split.nd):
        for tile in {lay.tile[d], 1, 2, 3, 5, 7, 12, 30}:
            want = math.lcm(*[(Fraction(tile) / s).denominator for s in ref._distinct_strides(split, d)])
            assert strides.period(tile, d) == want, (d, tile)
            for period in (1, 2, 3, 4):
                shift, whole = strides.shifts(period * tile, d)
                old = ref._shifts(split, Layout((), (tile,) * split.nd, ()), d, period)
                for node, value in old.items():
                    g = strides.group[d][node]
                    assert value == (int(shift[g]) if whole[g] else None), (d, tile, period)


def check_periodic(split, lay) -> None:
    """``_periodic``, ``dim_keys`` and ``_shifted`` on the diagonal's rows (every row and the working
    ones), counted and not, keyed or not: the same answers, keys, and rows counted as walked."""
    for name in ("row", "working_row"):
        for same in (True, False):
            new, old = Diagonal(split, lay), ref.OldDiagonal(split, lay)
            for d in range(split.nd):
                for g in {new.working[d]} if name == "working_row" else {lay.grid[d], new.working[d]}:
                    nrow, orow = getattr(new, name), getattr(old, name)
                    nkeys, okeys = {}, {}
                    got = grid._periodic(split, lay, nrow, d, _lengths(nrow, d), g, nkeys, same)
                    want = ref._periodic(split, lay, orow, d, _lengths(orow, d), g, okeys, same)
                    assert (got, nkeys) == (want, okeys), (name, d, g)
                    assert new.gaps == old.gaps
                    for j in range(g):
                        for p in (1, 2, 3):
                            if j + p < g:
                                args = (split, lay)
                                assert grid._shifted(*args, nrow, d, j, p) == ref._shifted(*args, orow, d, j, p)
                    assert new.gaps == old.gaps
                    ng = grid.dim_keys(split, lay, nrow, d, _lengths(nrow, d), g)
                    assert ng == ref.dim_keys(split, lay, orow, d, _lengths(orow, d), g)


def check_class_grid(split, lay, monkeypatch) -> None:
    """``class_grid`` and the bound's tables against the same built on the reference's rows."""
    grid._DIAGONALS.clear()
    got = grid._class_grid(split, lay)
    got_tables = bound.dim_tables(split, lay)
    with monkeypatch.context() as m:
        m.setattr(grid, "dim_keys", ref.dim_keys)
        m.setattr(bound, "dim_keys", ref.dim_keys)
        m.setattr(grid, "Diagonal", ref.OldDiagonal)
        grid._DIAGONALS.clear()
        want = grid._class_grid(split, lay)
        want_tables = bound.dim_tables(split, lay)
    grid._DIAGONALS.clear()
    assert isinstance(want.diagonal, ref.OldDiagonal) and not isinstance(got.diagonal, ref.OldDiagonal)
    assert (got.separable, got.per_dim, got.lasts) == (want.separable, want.per_dim, want.lasts)
    assert got.diagonal.gaps == want.diagonal.gaps
    if not got.separable:
        assert got.listed == want.listed
    assert (got_tables is None) == (want_tables is None)
    for a, b in zip(got_tables or (), want_tables or (), strict=True):
        assert (a.columns, a.last) == (b.columns, b.last)
        assert np.array_equal(a.lengths, b.lengths) and np.array_equal(a.counts, b.counts)


def check(split, shape, tile, monkeypatch) -> None:
    lay = layout(split, shape, tile)
    check_blocks(split, lay)
    check_period(split, lay)
    check_periodic(split, lay)
    check_class_grid(split, lay, monkeypatch)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_grid_equals_the_reference_on_named_networks(name, monkeypatch):
    make, shape, tiles = CASES[name]
    torch.manual_seed(0)
    splits = analyse(make().eval(), shape)
    if name in LONG:
        assert any(max(layout(s, shape, t).grid) > 8 for s in splits for t in tiles), "a long grid"
    for split in splits:
        for tile in tiles:
            check(split, shape, tile, monkeypatch)


def _check_blueprint(blueprint, scale: int) -> None:
    """The blueprint's network on its input and on one ``scale`` times larger (a long grid)."""
    net = blueprint.build().float()
    shape = blueprint.input_shape
    larger = shape[:2] + tuple(n * scale for n in shape[2:])
    with pytest.MonkeyPatch.context() as monkeypatch:
        for size in (shape, larger):
            try:
                splits = analyse(net, size)
            except Exception:  # noqa: BLE001  (a network whose ops fit its own input only)
                continue
            for split in splits:
                check(split, size, blueprint.tile, monkeypatch)


@examples(25)
@given(blueprints(nd=1, dag=True, max_steps=5), st.integers(2, 4))
def test_random_architectures_1d(blueprint, scale):
    _check_blueprint(blueprint, scale)


@examples(25)
@given(blueprints(nd=2, dag=True, max_steps=5), st.integers(2, 4))
def test_random_architectures_2d(blueprint, scale):
    _check_blueprint(blueprint, scale)


@examples(8)
@given(blueprints(nd=3, dag=True, max_steps=3), st.integers(2, 3))
def test_random_architectures_3d(blueprint, scale):
    _check_blueprint(blueprint, scale)
