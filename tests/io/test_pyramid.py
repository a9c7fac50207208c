"""write_pyramid and mosaic_slide: multiscale OME-TIFF read back by tifffile/zarr and open_slide."""

import numpy as np
import pytest
import torch

from bigpicture.errors import TilingError
from bigpicture.io import mosaic_slide, open_slide, write_pyramid
from bigpicture.io.pyramid import _halve, _mirror

tifffile = pytest.importorskip("tifffile")
zarr = pytest.importorskip("zarr")


def halvings(image, count):
    """The expected levels: each the 2x2 mean of the one above (last row/column repeated if odd)."""
    levels = [image]
    for _ in range(count - 1):
        levels.append(_halve(levels[-1]))
    return levels


def read_multiscale(path):
    """(levels as arrays in (C, H, W), axes, pixel sizes in µm per level along x) via tifffile and zarr."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        assert tif.is_ome and series.is_pyramidal
        group = zarr.open(series.aszarr(), mode="r")
        arrays = [np.asarray(group[str(k)]) for k in range(len(series.levels))]
        sizes = []
        for level in series.levels:
            numerator, denominator = level.keyframe.tags["XResolution"].value
            sizes.append(1e4 * denominator / numerator)
        ome = tif.ome_metadata
    channels_last = series.axes.endswith("S") and arrays[0].shape[-1] == 3
    arrays = [np.moveaxis(a, -1, 0) if channels_last else a for a in arrays]
    return arrays, ome, sizes


def test_rgb_pyramid(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (1, 3, 600, 1000), dtype=np.uint8)
    path = write_pyramid(image, tmp_path / "rgb.ome.tif", mpp=0.5)
    arrays, ome, sizes = read_multiscale(path)
    assert [a.shape for a in arrays] == [(3, 600, 1000), (3, 300, 500), (3, 150, 250)]
    for got, expected in zip(arrays, halvings(image[0], 3), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert 'PhysicalSizeX="0.5"' in ome and 'PhysicalSizeXUnit="µm"' in ome
    assert sizes == pytest.approx([0.5, 1.0, 2.0])


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_single_channel_pyramid(tmp_path, dtype):
    """One channel (a mask, a heatmap): one plane per level, axes YX, read back as (1, H, W)."""
    image = (np.random.default_rng(1).random((1, 1, 70, 90)) * 255).astype(dtype)
    path = write_pyramid(image, tmp_path / "mask.ome.tif", mpp=0.25, tile=32)
    arrays, ome, sizes = read_multiscale(path)
    assert [a.shape for a in arrays] == [(70, 90), (35, 45), (18, 23)]
    for got, expected in zip(arrays, halvings(image[0], 3), strict=True):
        np.testing.assert_array_equal(got, expected[0])
    assert sizes == pytest.approx([0.25, 0.5, 0.25 * 90 / 23])
    slide = open_slide(path, channels="all")
    assert slide[0].shape == (1, 70, 90) and slide.mpp == pytest.approx(0.25)
    np.testing.assert_array_equal(slide[0], image[0])


def test_multichannel_float_pyramid_from_a_tensor(tmp_path):
    image = torch.randn(4, 300, 270, dtype=torch.float32)
    path = write_pyramid(image, tmp_path / "feat.ome.tif", mpp=2.0, levels=3, tile=128)
    arrays, _, sizes = read_multiscale(path)
    assert [a.shape for a in arrays] == [(4, 300, 270), (4, 150, 135), (4, 75, 68)]
    for got, expected in zip(arrays, halvings(image.numpy(), 3), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert sizes[2] == pytest.approx(2.0 * 270 / 68)


def test_pyramid_without_pixel_size_and_one_level(tmp_path):
    image = np.arange(2 * 40 * 50, dtype=np.uint16).reshape(2, 40, 50)
    path = write_pyramid(image, tmp_path / "plain.ome.tif", levels=1)
    slide = open_slide(path, channels="all")
    assert slide.level_count == 1 and slide.mpp is None
    np.testing.assert_array_equal(slide[0], image)


def test_write_pyramid_errors(tmp_path):
    with pytest.raises(TilingError, match="one 2D image"):
        write_pyramid(np.zeros((2, 3, 8, 8), np.uint8), tmp_path / "x.tif")
    with pytest.raises(ValueError, match="multiple of 16"):
        write_pyramid(np.zeros((3, 8, 8), np.uint8), tmp_path / "x.tif", tile=100)
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        write_pyramid(np.zeros((3, 8, 8), np.uint8), tmp_path / "missing-dir" / "x.tif")


def test_mirror_positions():
    np.testing.assert_array_equal(_mirror(np.arange(12), 3), [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0])


def test_mosaic_of_a_small_region_is_exact(tmp_path, svs_path):
    """A lossless mosaic of a 300 x 200 crop of the real slide: 3 x 2 copies, every other one mirrored."""
    crop = open_slide(svs_path)[0, :, 1000:1300, 800:1000]
    source = write_pyramid(crop, tmp_path / "crop.ome.tif", mpp=0.499, levels=1)
    path = mosaic_slide(tmp_path / "mosaic.ome.tif", 3, 2, source, compression="zlib")
    slide = open_slide(path)
    row = np.concatenate([crop, crop[:, :, ::-1], crop], axis=2)
    np.testing.assert_array_equal(slide[0], np.concatenate([row, row[:, ::-1]], axis=1))
    assert slide.mpp == pytest.approx(0.499)


def test_mosaic_of_the_real_slide(tmp_path, svs_path):
    path = mosaic_slide(tmp_path / "big.ome.tif", 2, 1, svs_path)
    slide = open_slide(path)
    assert slide.shape == (1, 3, 2967, 4440) and slide.mpp == pytest.approx(0.499)
    assert [s[2:] for s in slide.level_shapes[-2:]] == [(186, 278), (93, 139)]
    original = open_slide(svs_path)[0, :, 1000:1200, 2000:2220].astype(int)
    mirrored = slide[0, :, 1000:1200, 2220:2440][:, :, ::-1]
    assert np.abs(mirrored - original).mean() < 3  # JPEG
