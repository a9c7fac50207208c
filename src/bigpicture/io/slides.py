"""Whole-slide images as lazy sources: OpenSlide formats and (pyramidal, OME-) TIFF.

``open_slide`` returns a source of shape ``(1, C, H, W)`` at one pyramid level
(C = 3 for ``channels="rgb"``). Reading a region decodes only the tiles it
touches: OpenSlide's ``read_region`` or slicing tifffile's zarr view of the TIFF.

OpenSlide addresses regions in level-0 coordinates and resamples when a level's
downsample is not an integer (most .svs pyramids: 4.0003...), so a region read
would not equal the same slice of the whole level. bigpicture therefore reads
such levels of TIFF-based files with tifffile, which returns stored pixels.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np

from bigpicture.errors import TilingError
from bigpicture.io.sources import FileSource, Region, existing_path, optional_import, register_opener

TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
MICRONS = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def open_slide(path: str | os.PathLike, level: int = 0, channels: str = "rgb", backend: str | None = None):
    """A lazy ``(1, C, H, W)`` source for one level of a slide.

    ``channels``: ``"rgb"`` (uint8 RGB for brightfield slides, alpha dropped) or
    ``"all"`` (every stored channel, e.g. fluorescence OME-TIFF; RGBA for OpenSlide).
    ``backend``: ``"openslide"``, ``"tifffile"`` or None to choose: OpenSlide for
    vendor formats it recognises, tifffile for generic and OME-TIFF and for
    levels above 0 of TIFF-based vendor files (see the module docstring).
    The source has ``level_count``, ``level_shapes`` (source shape per level),
    ``downsample`` and ``mpp`` (microns per pixel along x at this level, or None).
    """
    path = existing_path(path)
    if channels not in ("rgb", "all"):
        raise ValueError(f"channels must be 'rgb' or 'all', not {channels!r}")
    backend = backend or _choose_backend(path, level)
    if backend == "openslide":
        return OpenSlideSource(path, level, channels)
    if backend == "tifffile":
        return TiffSource(path, level, channels)
    raise ValueError(f"backend must be 'openslide', 'tifffile' or None, not {backend!r}")


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in TIFF_MAGIC


def _choose_backend(path: Path, level: int) -> str:
    try:
        import openslide
    except ImportError:
        return "tifffile"
    vendor = openslide.OpenSlide.detect_format(str(path))
    if vendor is None and not _is_tiff(path):
        return "openslide"  # neither reads it: OpenSlide's error names the formats
    if vendor in (None, "generic-tiff") or (level != 0 and _is_tiff(path)):
        return "tifffile"
    return "openslide"


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _unreadable(path: Path, reader: str, exc: Exception) -> TilingError:
    return TilingError(
        f"cannot read {path} as a slide with {reader}: {exc}. Check that the file is complete (not a "
        "truncated download or copy) and in a format OpenSlide or tifffile reads (svs, ndpi, mrxs, scn, "
        "(OME-)TIFF, ...)"
    )


def _check_level(path: Path, level: int, shapes: tuple, mpps: list) -> None:
    if isinstance(level, (int, np.integer)) and 0 <= level < len(shapes):
        return
    listed = ", ".join(
        f"{i}: {s[2]}x{s[3]}" + (f" at {m:.4g} µm/px" if m else "")
        for i, (s, m) in enumerate(zip(shapes, mpps, strict=True))
    )
    raise TilingError(f"{path} has no level {level!r}; pass one of the available levels: {listed}")


class OpenSlideSource(FileSource):
    """One level of a slide read with OpenSlide's ``read_region``."""

    def __init__(self, path: Path, level: int, channels: str):
        super().__init__(path)
        self.level, self.channels = level, channels
        slide = self.handle
        n_channels = 3 if channels == "rgb" else 4
        self.level_count = slide.level_count
        self.level_shapes = tuple((1, n_channels, h, w) for w, h in slide.level_dimensions)
        props = slide.properties
        base_mpp = float(props["openslide.mpp-x"]) if "openslide.mpp-x" in props else None
        downsamples = [float(d) for d in slide.level_downsamples]
        _check_level(path, level, self.level_shapes, [base_mpp and base_mpp * d for d in downsamples])
        self.downsample = downsamples[level]
        if self.downsample != round(self.downsample):
            raise TilingError(
                f"OpenSlide resamples regions of level {level} of {path} (downsample {self.downsample:.6g} "
                "is not an integer), so tiles would not equal the whole level; use backend='tifffile' "
                "(for TIFF-based files) or level 0"
            )
        self.mpp = base_mpp and base_mpp * self.downsample
        color = props.get("openslide.background-color", "FFFFFF")
        self.background = np.array([int(color[i : i + 2], 16) for i in (0, 2, 4)], np.uint8)
        self.shape, self.dtype = self.level_shapes[level], np.dtype(np.uint8)
        if _is_tiff(path) and _has("tifffile"):
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                _check_complete(path, tif.pages)
        self.probe()

    def open(self):
        openslide = optional_import("openslide", "reading slides with OpenSlide")
        try:
            return openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as exc:
            raise _unreadable(self.path, "OpenSlide", exc) from exc

    def read(self, region: Region) -> np.ndarray:
        n, c, ys, xs = region
        h, w = ys.stop - ys.start, xs.stop - xs.start
        at = (int(xs.start * self.downsample), int(ys.start * self.downsample))
        rgba = np.asarray(self.handle.read_region(at, self.level, (w, h)))
        if self.channels == "rgb":
            # Pixels outside the scanned area are transparent black; show them as the slide's background.
            rgb = rgba[..., :3].copy()
            rgb[rgba[..., 3] == 0] = self.background
            rgba = rgb
        return np.moveaxis(rgba, -1, 0)[None][:, c]


class TiffSource(FileSource):
    """One level of the first image series of a TIFF, read through tifffile's zarr view."""

    def __init__(self, path: Path, level: int, channels: str):
        super().__init__(path)
        self.level, self.channels = level, channels
        tif = self.tiff = self._open_tiff()
        levels = tif.series[0].levels
        layouts = [_layout(path, lv.axes, lv.shape, channels) for lv in levels]
        self.level_count = len(levels)
        self.level_shapes = tuple((1, n_c, h, w) for _, n_c, h, w in layouts)
        (_, _, h0, w0), base_mpp = self.level_shapes[0], _tiff_mpp(tif)
        downsamples = [(h0 / s[2] + w0 / s[3]) / 2 for s in self.level_shapes]
        _check_level(path, level, self.level_shapes, [base_mpp and base_mpp * d for d in downsamples])
        self.downsample = downsamples[level]
        self.mpp = base_mpp and base_mpp * self.downsample
        self.axes, self.shape = levels[level].axes, self.level_shapes[level]
        self.dtype = np.dtype(levels[level].dtype)
        _check_complete(path, levels[level].pages)
        self.probe()

    def _open_tiff(self):
        tifffile = optional_import("tifffile", "reading TIFF slides")
        try:
            tif = tifffile.TiffFile(str(self.path))
            _ = tif.series[0].levels[0].keyframe.shape  # parses the first IFD and its tags now
        except Exception as exc:
            raise _unreadable(self.path, "tifffile", exc) from exc
        tif.filehandle.set_lock(True)  # threads may read regions concurrently
        return tif

    def open(self):
        zarr = optional_import("zarr", "reading TIFF slides")
        if "tiff" not in self.__dict__:
            self.tiff = self._open_tiff()
        return zarr.open_array(self.tiff.series[0].aszarr(level=self.level), mode="r")

    def __getstate__(self) -> dict:
        return {k: v for k, v in super().__getstate__().items() if k != "tiff"}

    def read(self, region: Region) -> np.ndarray:
        n, c, ys, xs = region
        index, kept = [], []
        for axis, size in zip(self.axes, self.handle.shape, strict=True):
            if axis in "YX":
                index.append(ys if axis == "Y" else xs)
                kept.append(axis)
            elif axis in "SC" and size > 1:
                index.append(c)
                kept.append("C")
            else:
                index.append(0)
        data = np.asarray(self.handle[tuple(index)])
        if "C" in kept:
            c = slice(None)  # the channels were selected when reading
        else:
            data, kept = data[None], ["C", *kept]
        return np.transpose(data, [kept.index(a) for a in "CYX"])[None][n, c]


def _check_complete(path: Path, pages) -> None:
    """TilingError if the tile or strip data of ``pages`` runs past the end of the file."""
    size = os.path.getsize(path)
    for page in pages:
        ends = [o + b for o, b in zip(page.dataoffsets, page.databytecounts, strict=True) if b]
        if ends and max(ends) > size:
            raise TilingError(
                f"{path} is truncated: its image data runs to byte {max(ends)}, the file has {size} bytes. "
                "Copy or download it again"
            )


def _layout(path: Path, axes: str, shape: tuple, channels: str) -> tuple[str, int, int, int]:
    """(axes, channels, height, width) of one level; 2D images with at most one channel axis."""
    sizes = dict(zip(axes, shape, strict=True))
    extra = {a: n for a, n in sizes.items() if a not in "YXSC" and n > 1}
    multi = [a for a in "SC" if sizes.get(a, 1) > 1]
    if extra or len(multi) > 1 or "Y" not in sizes or "X" not in sizes:
        raise TilingError(
            f"{path} holds a {axes} image of shape {shape}; open_slide reads 2D images with one channel "
            "axis; for stacks use open_volume, or as_source on a (N, C, *spatial) zarr view of the file"
        )
    n_channels = sizes[multi[0]] if multi else 1
    if channels == "rgb":
        if n_channels not in (3, 4):
            raise TilingError(f"{path} has {n_channels} channels, not RGB(A); pass channels='all'")
        n_channels = 3
    return axes, n_channels, sizes["Y"], sizes["X"]


def _tiff_mpp(tif) -> float | None:
    """Microns per pixel along x at level 0: OME PhysicalSizeX, Aperio MPP, or a centimetre resolution tag."""
    if tif.is_ome and tif.ome_metadata:
        for element in ElementTree.fromstring(tif.ome_metadata).iter():
            if element.tag.endswith("}Pixels") and "PhysicalSizeX" in element.attrib:
                unit = element.attrib.get("PhysicalSizeXUnit", "µm")
                return float(element.attrib["PhysicalSizeX"]) * MICRONS.get(unit, float("nan"))
    page = tif.pages[0]
    found = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "") if tif.is_svs else None
    if found:
        return float(found.group(1))
    unit, xres = page.tags.get("ResolutionUnit"), page.tags.get("XResolution")
    if unit is not None and xres is not None and int(unit.value) == 3:
        numerator, denominator = xres.value
        return 1e4 * denominator / numerator if numerator else None
    return None


register_opener(lambda path: path.is_file(), open_slide, fallback=True)  # whatever else is a file: a slide
