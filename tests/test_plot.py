"""``bigpicture plan --plot``: the tile grid over a thumbnail, coloured by tile class, and the time per stage."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402

import bigpicture as bp  # noqa: E402
from bigpicture.cli import main  # noqa: E402
from bigpicture.cli.plot import tile_classes  # noqa: E402

MODEL = """
from torch import nn


def flat(dims=2, channels=3):
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(conv(channels, 4, 3, padding=1), nn.ReLU(), conv(4, 2, 3, stride=2, padding=1))
"""


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))  # nominal rates, not this machine's
    path = tmp_path / "nets.py"
    path.write_text(MODEL)
    return str(path)


def _picture(path) -> np.ndarray:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    return image


def test_plot_of_a_slide_sized_source(model_file, tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    z = zarr.open_array(
        str(tmp_path / "x.zarr"), mode="w", shape=(1, 3, 96, 80), chunks=(1, 3, 32, 32), dtype="f4"
    )
    z[:] = np.random.default_rng(0).random(z.shape, dtype=np.float32)
    png = tmp_path / "plan.png"
    args = ["plan", "--model", f"{model_file}:flat", "--source", str(tmp_path / "x.zarr"), "--tile", "32"]
    assert main([*args, "--device", "cpu,T4", "--plot", str(png)]) == 0
    assert f"plot of the plan on cpu: {png}" in capsys.readouterr().out
    assert _picture(png).std() > 0.05


def test_plot_of_a_volume_without_a_source(model_file, tmp_path):
    png = tmp_path / "volume.png"
    args = [
        "plan",
        "--model",
        f"{model_file}:flat",
        "--model-args",
        "dims=3,channels=1",
        "--input",
        "1x24x20x16",
    ]
    assert main([*args, "--tile", "8", "--plot", str(png)]) == 0
    picture = _picture(png)
    assert picture.shape[1] > 2 * picture.shape[0]  # three middle slices and the stages, side by side


def test_plot_of_a_volume_source(model_file, tmp_path):
    volume = np.random.default_rng(0).random((1, 1, 24, 20, 16), dtype=np.float32)
    np.save(tmp_path / "v.npy", volume)
    png = tmp_path / "v.png"
    args = ["plan", "--model", f"{model_file}:flat", "--model-args", "dims=3,channels=1"]
    assert main([*args, "--source", str(tmp_path / "v.npy"), "--tile", "8", "--plot", str(png)]) == 0
    _picture(png)


# name: (input shape, tile, classes): per dimension, a grid of 1 tile has 1 class, of 2 tiles 2
# (first, last), of 3 or more 3 (first, interior, last; a shorter last tile is still the last)
CLASSES = {
    "3x3_grid": ((1, 3, 48, 48), 16, 3 * 3),
    "4x4_grid": ((1, 3, 64, 64), 16, 3 * 3),
    "2x5_grid_remainder": ((1, 3, 32, 72), 16, 2 * 3),  # the last column is 8 px
    "one_tile": ((1, 3, 16, 16), 16, 1),
}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_tile_classes_are_the_performance_models(name):
    from torch import nn

    shape, tile, expected = CLASSES[name]
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2, padding=1))
    plan = bp.make_plan(model, shape, tile=tile)
    assert len(set(tile_classes(plan))) == expected == plan.prediction.classes


@pytest.fixture
def drawn(monkeypatch):
    """The figures plot_plan draws, kept open to be read (it closes them after saving)."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    return figures


def _rectangles(ax):
    """(x0, y0, width, height) of the owned tiles (the collection) and of the dashed read boxes."""
    (owned,) = ax.collections
    tiles = {tuple(np.round(p.get_extents().bounds, 6)) for p in owned.get_paths()}
    dashed = {(*p.get_xy(), p.get_width(), p.get_height()) for p in ax.patches if p.get_linestyle() == "--"}
    return tiles, dashed


def _xywh(box, rows: int, cols: int) -> tuple:
    return (box.lo[cols], box.lo[rows], box.shape[cols], box.shape[rows])


def test_picture_shows_every_tile_a_halo_per_class_the_thumbnail_and_the_stages(tmp_path, drawn):
    from torch import nn

    from bigpicture.cli.plot import plot_plan

    source = np.random.default_rng(0).random((1, 3, 40, 56), dtype=np.float32)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2, padding=1))
    plan = bp.make_plan(model, source.shape, tile=16)
    plot_plan(str(tmp_path / "p.png"), plan, plan.prediction, source)
    picture, stages = drawn[0].axes
    tiles, dashed = _rectangles(picture)
    assert tiles == {_xywh(t.box, 0, 1) for t in plan.tiles} and len(tiles) == len(plan.tiles) == 12
    reads = {_xywh(t.read, 0, 1): t for t in plan.tiles}
    assert len(dashed) == len(set(tile_classes(plan))) and dashed <= reads.keys()
    assert all(reads[d].read.shape != reads[d].box.shape for d in dashed)  # the write box and its halo
    grey = source[0].mean(axis=0)
    lo, hi = np.percentile(grey, [1, 99])
    (image,) = picture.get_images()
    np.testing.assert_allclose(image.get_array(), np.clip((grey - lo) / (hi - lo), 0, 1), rtol=1e-5)
    bars = {b.get_width() for b in stages.patches}
    assert bars == {s.seconds for s in plan.prediction.stages if s.seconds} and len(bars) > 1


def test_volume_picture_shows_the_tiles_crossing_each_middle_slice(tmp_path, drawn):
    from torch import nn

    from bigpicture.cli.plot import plot_plan

    shape = (1, 1, 24, 20, 16)
    model = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv3d(2, 2, 3, padding=1))
    plan = bp.make_plan(model, shape, tile=8)
    plot_plan(str(tmp_path / "v.png"), plan, plan.prediction)
    *views, _ = drawn[0].axes
    for ax, (rows, cols, across) in zip(views, [(1, 2, 0), (0, 2, 1), (0, 1, 2)], strict=True):
        middle = shape[2 + across] // 2
        crossing = [t for t in plan.tiles if t.box.lo[across] <= middle < t.box.hi[across]]
        tiles, _ = _rectangles(ax)
        assert tiles == {_xywh(t.box, rows, cols) for t in crossing}
        assert not ax.get_images()  # no source: no thumbnail
