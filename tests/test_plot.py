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
