"""3D volumes as lazy sources: NIfTI (nibabel) and DICOM series (pydicom).

Axis order: the spatial axes ``(D, H, W)`` of the source are the file's voxel
array axes in storage order, ``(i, j, k)`` for NIfTI (as ``nibabel.load(path).
get_fdata()`` and MONAI's ``LoadImage`` give them, no reorientation) and
``(slice, row, column)`` for DICOM, slices sorted along the slice normal.
``.spacing`` is the voxel size along those axes, in the file's unit (mm for
DICOM and nearly all NIfTI).

    NIfTI (I, J, K)     -> (1, 1, I, J, K)
    NIfTI (I, J, K, T)  -> (1, T, I, J, K)      the 4th axis becomes channels
    DICOM folder        -> (1, 1, slices, rows, columns)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bigpicture.errors import TilingError
from bigpicture.io.sources import (
    FileSource,
    Region,
    existing_path,
    optional_import,
    region_shape,
    register_opener,
)


def open_volume(path: str | os.PathLike):
    """A lazy ``(1, C, D, H, W)`` source for a NIfTI file or a folder holding one DICOM series.

    For large volumes prefer uncompressed ``.nii``: a region reads only its own
    bytes, while each region of a ``.nii.gz`` is decompressed from the start of
    the file (install ``indexed_gzip`` to make that fast).
    """
    path = existing_path(path)
    return DicomSource(path) if path.is_dir() else NiftiSource(path)


def _unreadable(path: Path, exc: Exception) -> TilingError:
    return TilingError(
        f"cannot read {path} as a volume with nibabel: {exc}. Check that the file is complete (not a "
        "truncated download or copy) and a NIfTI (.nii, .nii.gz) or other format nibabel reads"
    )


class NiftiSource(FileSource):
    """A NIfTI image read region by region through nibabel's array proxy."""

    def __init__(self, path: Path):
        super().__init__(path)
        image = self.handle
        shape = tuple(int(n) for n in image.shape)
        if not 2 <= len(shape) <= 4:
            raise TilingError(
                f"{path} holds a {len(shape)}-d image of shape {shape}; open_volume reads 2-d, 3-d, or 3-d "
                "images with a 4th axis of channels"
            )
        spatial, channels = (shape[:3], shape[3]) if len(shape) == 4 else (shape, 1)
        self.shape = (1, channels, *spatial)
        self.spacing = tuple(float(z) for z in image.header.get_zooms()[: len(spatial)])
        self.affine = image.affine
        self._check_complete(image.dataobj)
        corner = (slice(0, 1),) * len(shape)
        self.dtype = np.asarray(self._read_proxy(corner)).dtype
        self.probe()

    def open(self):
        nibabel = optional_import("nibabel", "reading NIfTI volumes")
        try:
            return nibabel.load(str(self.path))
        except Exception as exc:
            raise _unreadable(self.path, exc) from exc

    def _read_proxy(self, index: tuple) -> np.ndarray:
        return np.asarray(self.handle.dataobj[index])

    def _check_complete(self, proxy) -> None:
        """TilingError if the voxel data runs past the end of the file, checked without reading it."""
        needed = getattr(proxy, "offset", 0) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
        if self.path.name.lower().endswith(".gz"):
            with open(self.path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                stored = int.from_bytes(f.read(4), "little")  # gzip's ISIZE: uncompressed size mod 2**32
            if stored == needed % 2**32:
                return
            try:  # multi-member gzip files break the ISIZE check: decide by reading the last voxel
                self._read_proxy(tuple(slice(n - 1, n) for n in proxy.shape))
                return
            except Exception as exc:
                raise _unreadable(self.path, exc) from exc
        size = os.path.getsize(self.path)
        if size < needed:
            raise TilingError(
                f"{self.path} is truncated: its header describes {needed} bytes of data and header, the "
                f"file has {size}. Copy or download it again"
            )

    def read(self, region: Region) -> np.ndarray:
        n, c, *spatial = region
        if len(self.handle.shape) == 4:
            data = np.moveaxis(self._read_proxy((*spatial, c)), -1, 0)
        else:
            data = self._read_proxy(tuple(spatial))[None][c]
        return data[None][n]


class DicomSource(FileSource):
    """A folder holding one DICOM series of single-frame 2D slices, read slice by slice.

    Slices are sorted by their position along the slice normal
    (ImagePositionPatient, ImageOrientationPatient), else by InstanceNumber;
    RescaleSlope and RescaleIntercept are applied (then the dtype is float32).
    """

    def __init__(self, path: Path):
        super().__init__(path)
        headers = self._headers()
        rows, columns = headers[0].Rows, headers[0].Columns
        odd = [h.filename for h in headers if (h.Rows, h.Columns) != (rows, columns)]
        if odd or any(int(getattr(h, "NumberOfFrames", 1) or 1) > 1 for h in headers):
            raise TilingError(
                f"{path}: open_volume reads series of single-frame slices of one size ({rows}x{columns}); "
                f"{len(odd)} slices differ, e.g. {odd[:3]}, or the series is multi-frame"
            )
        if int(getattr(headers[0], "SamplesPerPixel", 1)) != 1:
            raise TilingError(f"{path}: open_volume reads greyscale DICOM, this series is colour")
        positions = _slice_positions(headers)
        order = np.argsort(positions, kind="stable")
        headers = [headers[i] for i in order]
        self.files = [Path(h.filename) for h in headers]
        self.rescale = [
            (float(getattr(h, "RescaleSlope", 1)), float(getattr(h, "RescaleIntercept", 0))) for h in headers
        ]
        gaps = np.diff(np.sort(positions))
        thickness = float(getattr(headers[0], "SliceThickness", 0) or 1)
        row_spacing, column_spacing = (float(s) for s in getattr(headers[0], "PixelSpacing", (1, 1)))
        self.spacing = (float(np.median(gaps)) if len(gaps) else thickness, row_spacing, column_spacing)
        self.shape = (1, 1, len(self.files), int(rows), int(columns))
        rescaled = any(r != (1.0, 0.0) for r in self.rescale)
        self.dtype = np.dtype(np.float32) if rescaled else self._slice(0).dtype
        self.probe()

    def _headers(self) -> list:
        pydicom = optional_import("pydicom", "reading DICOM series")
        headers = []
        for file in sorted(f for f in self.path.iterdir() if f.is_file() and not f.name.startswith(".")):
            try:
                header = pydicom.dcmread(file, stop_before_pixels=True)
            except pydicom.errors.InvalidDicomError:
                continue  # not DICOM: notes, thumbnails, DICOMDIR parts
            except Exception as exc:
                raise TilingError(f"cannot read the DICOM header of {file}: {exc}. Copy it again") from exc
            if "Rows" in header:
                headers.append(header)
        series = {str(getattr(h, "SeriesInstanceUID", "")) for h in headers}
        if not headers or len(series) > 1:
            found = f"{len(series)} series" if headers else "no DICOM image files"
            raise TilingError(
                f"{self.path}: open_volume needs a folder with exactly one DICOM series, found {found}"
            )
        return headers

    def _slice(self, k: int) -> np.ndarray:
        pydicom = optional_import("pydicom", "reading DICOM series")
        return pydicom.dcmread(self.files[k]).pixel_array

    def read(self, region: Region) -> np.ndarray:
        n, c, ks, rows, columns = region
        out = np.empty(region_shape(region)[2:], self.dtype)
        for i, k in enumerate(range(ks.start, ks.stop)):
            pixels = self._slice(k)[rows, columns]
            slope, intercept = self.rescale[k]
            out[i] = pixels if (slope, intercept) == (1.0, 0.0) else pixels * slope + intercept
        return out[None, None][n, c]


def _slice_positions(headers: list) -> np.ndarray:
    """Each slice's position along the slice normal, or its InstanceNumber when positions are missing."""
    try:
        orientation = np.array(headers[0].ImageOrientationPatient, float)
        normal = np.cross(orientation[:3], orientation[3:])
        return np.array([np.dot(np.array(h.ImagePositionPatient, float), normal) for h in headers])
    except AttributeError:
        return np.array([float(getattr(h, "InstanceNumber", i)) for i, h in enumerate(headers)])


_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
# after zarr (a zarr store is a folder too): volume files by name, and any other folder as a DICOM series
register_opener(lambda path: path.name.lower().endswith(_VOLUME_SUFFIXES) or path.is_dir(), open_volume)
