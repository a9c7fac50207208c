"""Volumes: NIfTI and DICOM region reads equal slices of the whole (synthetic volumes), and clear errors."""

import numpy as np
import pytest

from bigpicture.errors import TilingError
from bigpicture.io import as_source, open_volume

nibabel = pytest.importorskip("nibabel")


def write_nifti(path, data, zooms=(0.8, 0.9, 2.5), slope=None):
    image = nibabel.Nifti1Image(data, np.diag([*zooms, 1.0]))
    image.header.set_zooms(zooms + image.header.get_zooms()[3:])
    if slope is not None:
        image.header.set_slope_inter(slope, -100.0)
    nibabel.save(image, str(path))
    return path


@pytest.fixture
def volume():
    """A synthetic (I, J, K) = (20, 17, 9) int16 volume."""
    return np.random.default_rng(0).integers(-1000, 3000, (20, 17, 9), dtype=np.int16)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_regions_equal_the_whole(tmp_path, volume, suffix, check_regions):
    source = open_volume(write_nifti(tmp_path / f"ct{suffix}", volume))
    assert source.shape == (1, 1, 20, 17, 9) and source.dtype == np.int16
    assert source.spacing == pytest.approx((0.8, 0.9, 2.5))
    check_regions(source, volume[None, None])


def test_nifti_scaled_and_4d(tmp_path, check_regions):
    data = np.random.default_rng(1).integers(0, 200, (8, 7, 6, 3), dtype=np.int16)
    source = as_source(write_nifti(tmp_path / "dwi.nii", data, slope=2.0))
    expected = np.asarray(nibabel.load(str(tmp_path / "dwi.nii")).dataobj)
    assert source.shape == (1, 3, 8, 7, 6)
    check_regions(source, np.moveaxis(expected, -1, 0)[None])


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti(tmp_path, volume, suffix):
    path = write_nifti(tmp_path / f"ct{suffix}", volume)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])
    with pytest.raises(TilingError, match=f"ct{suffix}"):
        open_volume(path)


def test_unreadable_and_missing_volume(tmp_path):
    (tmp_path / "junk.nii").write_bytes(b"\x00" * 400)
    with pytest.raises(TilingError, match="junk.nii"):
        open_volume(tmp_path / "junk.nii")
    with pytest.raises(FileNotFoundError, match="gone.nii.gz"):
        open_volume(tmp_path / "gone.nii.gz")


def write_dicom_series(folder, volume, slope=1.0, intercept=-1024.0, series_uid="1.2.3"):
    """Write ``volume`` (slices, rows, columns) as a synthetic series, files named in shuffled order."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    folder.mkdir(exist_ok=True)
    order = np.random.default_rng(5).permutation(len(volume))
    for name, k in enumerate(order):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.PixelData = volume[k].astype(np.int16).tobytes()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 3.0 * k - 40]
        ds.InstanceNumber = int(name)
        ds.PixelSpacing = [0.7, 0.6]
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.SeriesInstanceUID = series_uid
        ds.save_as(folder / f"{name:03d}.dcm")
    (folder / "notes.txt").write_text("not DICOM")
    return folder


def test_dicom_series_regions_equal_the_whole(tmp_path, check_regions):
    volume = np.random.default_rng(2).integers(0, 2000, (6, 12, 10), dtype=np.int16)
    source = open_volume(write_dicom_series(tmp_path / "series", volume))
    assert source.shape == (1, 1, 6, 12, 10) and source.dtype == np.float32
    assert source.spacing == pytest.approx((3.0, 0.7, 0.6))
    check_regions(source, (volume.astype(np.float32) - 1024)[None, None])


def test_dicom_folder_errors(tmp_path):
    pytest.importorskip("pydicom")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TilingError, match="no DICOM image files"):
        open_volume(tmp_path / "empty")
    volume = np.zeros((2, 4, 4), np.int16)
    write_dicom_series(tmp_path / "mixed", volume)
    ds_path = tmp_path / "other"
    write_dicom_series(ds_path, volume, series_uid="9.9.9")
    (tmp_path / "mixed" / "zzz.dcm").write_bytes((ds_path / "000.dcm").read_bytes())
    with pytest.raises(TilingError, match="exactly one DICOM series, found 2 series"):
        open_volume(tmp_path / "mixed")
