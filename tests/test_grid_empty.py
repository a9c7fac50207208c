"""Tiles that compute empty boxes, counted per dimension: the same classes and predictions as walking
every tile.

A network of valid convolutions and crops (HoVerNet) writes less than its input, so the last tiles of
a grid may write nothing: the engine skips them, and the planner counts the others per dimension
(``grid.class_grid``), as if they were the whole grid. A transposed convolution's output padding
can leave a tile with an empty box inside the network: there the product rule does not hold, and the
planner walks each tile, or past ``grid.MAX_WALKS`` tiles one tile per combination of translates.
The reference is the definition: every tile with work walked on its own.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from helpers import assert_tiled_matches
from hypothesis import given
from test_planning_speed import reference
from test_random_architectures import blueprints, examples
from torch import nn

import bigpicture as bp
from bigpicture.engine import regions
from bigpicture.engine.tiles import Diagonal, Tiles
from bigpicture.perf import classes, grid
from bigpicture.perf.devices import get_device
from bigpicture.perf.grid import class_grid, layout
from bigpicture.perf.rates import Rates
from bigpicture.perf.schedule import analyse
from bigpicture.perf.walk import last_tile


@pytest.fixture(autouse=True)
def _uncalibrated(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))


class Valid(nn.Module):
    """HoVerNet's pattern: valid convolutions, a pooled branch upsampled and added to a centre crop."""

    def __init__(self, nd: int) -> None:
        super().__init__()
        conv = (nn.Conv2d, nn.Conv3d)[nd - 2]
        self.nd, self.a = nd, conv(1, 3, 3)
        self.pool = (nn.MaxPool2d, nn.MaxPool3d)[nd - 2](2)
        self.deep = conv(3, 3, 3)
        self.up = nn.Upsample(scale_factor=2)
        self.out = conv(3, 2, 3, padding=1)

    def forward(self, x):
        a = torch.relu(self.a(x))
        u = self.up(self.deep(self.pool(a)))
        crop = (slice(None), slice(None)) + (slice(2, -2),) * self.nd
        return self.out(a[crop] + u)


class OutputPadding(nn.Module):
    """A column of the output that only a transposed convolution's output padding writes: the tile
    that owns it needs an empty box of the convolution's input (test_random_architectures' regression)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, 1, 2, stride=2)
        self.up = nn.ConvTranspose2d(1, 1, 2, stride=2, output_padding=1)

    def forward(self, x):
        return torch.cat([x, self.up(self.down(x))], 1)


CASES = {  # name: (model, input shape, tiles); each has tiles past the last one that writes
    "valid chain 2d": (
        lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)),
        (1, 1, 38, 30),
        [4, 6, (4, 12)],
    ),
    "valid chain, non-square grid": (
        lambda: nn.Sequential(nn.Conv2d(1, 2, 5), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1)),
        (1, 1, 45, 19),
        [3, 4, (4, 6)],
    ),
    "crop and skip 2d": (lambda: Valid(2), (1, 1, 44, 38), [4, 6, 8]),
    "crop and skip 3d": (lambda: Valid(3), (1, 1, 20, 16, 22), [4, 6]),
    "valid chain 3d": (
        lambda: nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU(), nn.MaxPool3d(2), nn.Conv3d(2, 2, 3)),
        (1, 1, 27, 18, 21),
        [4, (2, 4, 6)],
    ),
}


def _key(split, writes, need) -> tuple:
    """What a tile's boxes are up to a translation: their shapes (the predictions below check that the
    tiles counted alike cost alike)."""
    return tuple(w.shape for w in writes), tuple(need[n].shape for n in sorted(need, key=str))


def every_tile(split, lay) -> Counter:
    """Each tile with work walked on its own, counted by what it costs."""
    out: Counter = Counter()
    for t in Tiles.of(split, lay):
        out[_key(split, t.writes, regions.needs(split, dict(zip(split.sinks, t.writes, strict=True))))] += 1
    return out


def counted(split, lay) -> Counter:
    out: Counter = Counter()
    for c in class_grid(split, lay).materialise():
        out[_key(split, c.writes, c.need)] += c.count
    return out


def assert_predicts_as_every_tile(split, shape, tile, rates, training: bool) -> None:
    cg = class_grid(split, layout(split, shape, tile))
    for copy in (True, False):
        got = classes.aggregate(split, cg, torch.float32, rates, training, False, copy, {})
        want, n = reference(split, shape, torch.float32, tile, rates, training, copy)
        assert cg.tiles == n, (tile, cg.tiles, n)
        assert (got.peak, got.peak_train) == (want.peak, want.peak_train), (tile, copy)
        assert (got.flops_fwd, got.flops_bwd, got.nodes, got.ops) == (
            want.flops_fwd, want.flops_bwd, want.nodes, want.ops
        )  # fmt: skip
        assert got.fwd_s == pytest.approx(want.fwd_s, rel=1e-12)
        assert got.bwd_s == pytest.approx(want.bwd_s, rel=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_tiles_past_the_last_writing_one_are_counted_per_dimension(name):
    make, shape, tiles = CASES[name]
    split = analyse(make().eval(), shape)[-1]
    fewer = []
    for tile in tiles:
        lay = layout(split, shape, tile)
        cg = class_grid(split, lay)
        working = Tiles.of(split, lay).working
        assert working != lay.grid, (tile, "a tile writes nothing: the case tests that")
        assert cg.separable, (tile, "counted per dimension, not tile by tile")
        assert counted(split, lay) == every_tile(split, lay), tile
        assert cg.tiles == math.prod(working)
        fewer.append(cg.classes < cg.tiles)
    assert any(fewer)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("device", ["cpu", "H100-SXM"])
@pytest.mark.parametrize("name", list(CASES))
def test_predictions_with_tiles_past_the_last_writing_one_equal_walking_every_tile(name, device, training):
    make, shape, tiles = CASES[name]
    split = analyse(make().eval(), shape)[-1]
    rates = Rates(get_device(device), torch.float32)
    for tile in tiles:
        assert_predicts_as_every_tile(split, shape, tile, rates, training)


@pytest.mark.parametrize("name", list(CASES))
def test_the_last_tile_is_the_last_one_that_writes(name):
    """A training step keeps the graph of the last tile the engine runs (the last with work)."""
    make, shape, tiles = CASES[name]
    split = analyse(make().eval(), shape)[-1]
    for tile in tiles:
        lay = layout(split, shape, tile)
        last = Tiles.of(split, lay)[-1]
        need, writes = last_tile(split, lay)
        assert writes == last.writes and not any(w.empty for w in writes)
        assert need == regions.needs(split, dict(zip(split.sinks, last.writes, strict=True)))


def test_rows_of_a_grid_longer_in_one_dimension_keep_that_dimension():
    """Row k of a grid whose tiles along another dimension stop writing before k: its boxes along the
    dimension where k writes are those of every tile of index k there; the other dimension is empty."""
    make, shape, _ = CASES["valid chain, non-square grid"]
    split = analyse(make().eval(), shape)[-1]
    lay = layout(split, shape, 4)
    diagonal, tiles = Diagonal(split, lay), Tiles.of(split, lay)
    assert diagonal.working == tiles.working == (11, 4) and lay.grid == (12, 5)
    for k in range(4, 11):  # dimension 0 writes, dimension 1 does not
        writes, need = diagonal.row(k)
        real = regions.needs(split, dict(zip(split.sinks, tiles.tile((k, 3)).writes, strict=True)))
        assert all(need[n].dim(0) == real[n].dim(0) and need[n].empty for n in real)
        assert diagonal.working_row(k)[1] == real
    assert diagonal.walk_all().separable and tiles.separable


@pytest.mark.parametrize("tile", [4, 6])
def test_empty_boxes_inside_the_network_walk_each_tile(tile, monkeypatch):
    """Output padding: no product rule. Each tile walked, and past ``MAX_WALKS`` tiles one per
    combination of translates: both equal every tile; too many combinations is a clear error."""
    shape = (1, 1, 61, 49)
    split = analyse(OutputPadding().eval(), shape)[-1]
    lay = layout(split, shape, tile)
    grid._CLASSES.clear()
    cg = class_grid(split, lay)
    assert not cg.separable
    want = every_tile(split, lay)
    assert counted(split, lay) == want
    walks = []
    real = grid._tile
    monkeypatch.setattr(grid, "_tile", lambda *a: walks.append(a[2]) or real(*a))
    monkeypatch.setattr(grid, "MAX_WALKS", math.prod(lay.grid) - 1)
    grid._CLASSES.clear()
    assert counted(split, lay) == want
    assert len(walks) < math.prod(lay.grid) // 2
    rates = Rates(get_device("cpu"), torch.float32)
    assert_predicts_as_every_tile(split, shape, tile, rates, True)
    monkeypatch.setattr(grid, "MAX_WALKS", 3)
    grid._CLASSES.clear()
    with pytest.raises(bp.TilingError, match="kinds of tiles.*Give a larger tile="):
        class_grid(split, lay)
    grid._CLASSES.clear()


def _check_blueprint(blueprint) -> None:
    net = blueprint.build().float()
    shape = blueprint.input_shape
    for split in analyse(net, shape):
        if split.input not in split.order:
            continue
        lay = layout(split, shape, blueprint.tile)
        assert counted(split, lay) == every_tile(split, lay)
        assert_predicts_as_every_tile(
            split, shape, blueprint.tile, Rates(get_device("cpu"), torch.float32), True
        )


@examples(25)
@given(blueprints(nd=2, dag=True, max_steps=5))
def test_random_architectures_2d_count_as_every_tile(blueprint):
    _check_blueprint(blueprint)


@examples(10)
@given(blueprints(nd=3, dag=True, max_steps=3))
def test_random_architectures_3d_count_as_every_tile(blueprint):
    _check_blueprint(blueprint)


@pytest.mark.parametrize("name", ["valid chain, non-square grid", "crop and skip 2d", "crop and skip 3d"])
def test_the_engine_reads_the_diagonal_of_such_grids_exactly(name, one_thread):
    """The engine finds each tile's read box on the diagonal of these grids too (``Tiles.separable``):
    tiled equals untiled, in float64, outputs and every gradient."""
    make, shape, tiles = CASES[name]
    torch.manual_seed(0)
    model = make().double().eval()
    for tile in tiles:
        plan = bp.tiled(model, tile=tile).plan_for(torch.zeros(shape, dtype=torch.float64))
        assert plan.tiles.separable and plan.tiles.working != plan.grid
        assert_tiled_matches(model, torch.randn(shape, dtype=torch.float64), tile)
