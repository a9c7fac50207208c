"""Array-like sources and transforms: region reads equal slices of the whole (synthetic data)."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from bigpicture.errors import TilingError
from bigpicture.io import Source, as_source
from bigpicture.io.sources import normalise_key


@pytest.fixture
def image():
    """A synthetic (2, 3, 37, 41) float32 image."""
    return np.random.default_rng(1).standard_normal((2, 3, 37, 41)).astype(np.float32)


def test_numpy(image, check_regions):
    check_regions(as_source(image), image)


def test_memmap(image, tmp_path, check_regions):
    memmap = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", image.dtype, image.shape)
    memmap[:] = image
    check_regions(as_source(memmap), image)
    check_regions(as_source(tmp_path / "x.npy"), image)


def test_zarr(image, tmp_path, check_regions):
    zarr = pytest.importorskip("zarr")
    array = zarr.open_array(
        str(tmp_path / "x.zarr"), mode="w", shape=image.shape, chunks=(1, 3, 8, 8), dtype="f4"
    )
    array[:] = image
    check_regions(as_source(array), image)
    check_regions(as_source(str(tmp_path / "x.zarr")), image)


def test_tensor(image, check_regions):
    tensor = torch.from_numpy(image).requires_grad_()
    check_regions(as_source(tensor), image)


def test_3d(check_regions):
    volume = np.arange(2 * 9 * 10 * 11, dtype=np.int16).reshape(1, 2, 9, 10, 11)
    check_regions(as_source(volume), volume)


def test_regions_are_copies(image):
    """A model changing its input tile in place must not change the image other tiles read."""
    before = image.copy()
    for obj in [image, torch.from_numpy(image)]:
        as_source(obj)[0, :, :5, :5][...] = 0
    np.testing.assert_array_equal(image, before)


def test_source_is_returned_as_is(image):
    source = as_source(image)
    assert as_source(source) is source
    assert np.array_equal(np.asarray(source), image)


@pytest.mark.parametrize(
    "transform",
    [
        lambda x: x.astype(np.float64) * 2.5 - 1,
        lambda x: (x - np.array([0.1, 0.2, 0.3], np.float32)[:, None, None]) / 0.5,
        lambda x: x.mean(axis=1, keepdims=True).repeat(3, axis=1),  # mixes the channels of each pixel
    ],
    ids=["affine", "per-channel", "channel-mix"],
)
def test_transform_per_region_equals_transform_of_whole(image, transform, check_regions):
    source = as_source(image, transform=transform)
    expected = transform(image)
    assert source.dtype == expected.dtype
    check_regions(source, expected)


def test_transform_on_a_slide_like_uint8_source(check_regions):
    rgb = np.random.default_rng(2).integers(0, 256, (1, 3, 30, 20), dtype=np.uint8)
    to_float = lambda x: x.astype(np.float32) / 255
    check_regions(as_source(rgb, to_float), to_float(rgb))


def test_transform_not_pointwise_is_refused(image):
    with pytest.raises(TilingError, match="not pointwise"):
        as_source(image, transform=lambda x: (x - x.mean()) / x.std())


def test_transform_changing_shape_is_refused(image):
    with pytest.raises(TilingError, match="keep the shape"):
        as_source(image, transform=lambda x: x[:, :1])


def test_indexing_like_numpy(image):
    source = as_source(image)
    for key in [(1, slice(None), 5), (-1, 2), (Ellipsis, slice(3, 100)), (0, ..., 4, slice(-5, None)), ()]:
        np.testing.assert_array_equal(source[key], image[key], err_msg=str(key))


def test_bad_indices():
    shape = (1, 3, 10, 10)
    with pytest.raises(IndexError, match="step"):
        normalise_key((slice(None), slice(None), slice(0, 10, 2)), shape)
    with pytest.raises(IndexError, match="out of bounds"):
        normalise_key((0, 3), shape)
    with pytest.raises(IndexError, match="5 indices"):
        normalise_key((0, 0, 0, 0, 0), shape)


def test_not_channel_first_or_not_an_array():
    with pytest.raises(TilingError, match="channel-first"):
        as_source(np.zeros((64, 64)))
    with pytest.raises(TypeError, match="cannot read a dict"):
        as_source({"shape": 1})
    with pytest.raises(TilingError, match="numpy dtype"):
        as_source(torch.zeros(1, 1, 4, 4, dtype=torch.bfloat16))


def test_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here.svs"):
        as_source(tmp_path / "nothing-here.svs")


def test_read_errors_name_the_region():
    class Broken(Source):
        shape, dtype = (1, 1, 8, 8), np.dtype(np.uint8)

        def read(self, region):
            raise OSError("disk on fire")

    with pytest.raises(TilingError, match=r"region \[0:1, 0:1, 2:4, 0:8\] failed: disk on fire"):
        Broken()[0:1, :, 2:4]


def test_pickled_array_source_reads_the_same(image):
    source = as_source(image, transform=np.abs)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(source))[0, :, 3:9], np.abs(image)[0, :, 3:9])


def test_core_import_needs_no_optional_library():
    code = (
        "import sys, bigpicture.io; "
        "loaded = [m for m in ('openslide', 'tifffile', 'zarr', 'nibabel', 'pydicom') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
