"""Export to pyramidal OME-TIFF, tile by tile, and big real-content test slides.

``write_pyramid`` never holds a whole level in memory: level 0 is read from the
source one tile at a time, and each tile's 2x2 mean goes into a temporary
memory-mapped level 1 (on disk, next to the output), which is written and
reduced in turn:

    level 0  |################|  tiles read from the source, written, halved into ->
    level 1  |########|          temporary memmap, written, halved into ->
    level 2  |####|              ... until a level fits in one tile

The file opens in QuPath, napari (tifffile/zarr) and bigpicture's ``open_slide``
as a multiscale image with its physical pixel size.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from bigpicture.errors import TilingError
from bigpicture.io.sources import Region, Source, as_source, optional_import


def write_pyramid(
    image,
    path: str | os.PathLike,
    mpp: float | None = None,
    levels: int | None = None,
    tile: int = 256,
    compression: str | None = "zlib",
) -> Path:
    """Write a 2D ``(C, H, W)`` or ``(1, C, H, W)`` image as a pyramidal OME-TIFF at ``path``.

    ``image`` is anything ``as_source`` takes (array, tensor, zarr, slide, ...); of a store that
    ``net.run(..., out=)`` wrote with several outputs, one array: ``"seg.zarr/0"`` or ``group["0"]``.
    ``mpp``: microns per pixel of the image, stored as OME PhysicalSizeX/Y and as
    resolution tags (scaled per level). ``levels``: number of levels including
    the full resolution; by default halve until a level fits in one tile.
    uint8 RGB is stored as RGB tiles; anything else as one plane per channel.
    ``compression``: a tifffile codec name, lossless ``"zlib"`` by default
    (``"jpeg"`` is far smaller for RGB, but lossy).
    """
    tifffile = optional_import("tifffile", "write_pyramid")
    source = as_source(image)
    if source.ndim == 4 and source.shape[0] == 1:
        key = lambda c, ys, xs: (0, c, ys, xs)
    elif source.ndim == 3:
        key = lambda c, ys, xs: (c, ys, xs)
    else:
        raise TilingError(
            f"write_pyramid writes one 2D image, (C, H, W) or (1, C, H, W); got shape {source.shape}"
        )
    if tile % 16 or tile <= 0:
        raise ValueError(f"TIFF tiles must be a positive multiple of 16, not {tile}")
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such directory to write {path.name} into")
    channels, height, width = source.shape[-3:]
    shapes = _level_shapes(height, width, tile, levels)
    contig = channels == 3 and source.dtype == np.uint8
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}-") as tmp:
        below = [
            np.lib.format.open_memmap(Path(tmp) / f"{k}.npy", "w+", source.dtype, (channels, h, w))
            for k, (h, w) in enumerate(shapes[1:], start=1)
        ]
        reads = [lambda c, ys, xs: source[key(c, ys, xs)]]
        reads += [lambda c, ys, xs, level=level: np.asarray(level[c, ys, xs]) for level in below]
        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
            for k, (h, w) in enumerate(shapes):
                tiles = _tiles(reads[k], (channels, h, w), tile, contig, below[k] if k < len(below) else None)
                options = {
                    "shape": (h, w, channels) if contig else (channels, h, w)[channels == 1 :],
                    "dtype": source.dtype,
                    "tile": (tile, tile),
                    "photometric": "rgb" if contig else "minisblack",
                    # one channel is one plane, which tifffile will not call separate
                    "planarconfig": "contig" if contig else "separate" if channels > 1 else None,
                    "compression": compression,
                }
                if mpp:
                    options["resolution"] = (1e4 * w / (mpp * width), 1e4 * h / (mpp * height))
                    options["resolutionunit"] = "CENTIMETER"
                if k == 0:
                    options["subifds"] = len(shapes) - 1
                    options["metadata"] = _ome_metadata(contig, mpp, channels)
                else:
                    options["subfiletype"] = 1
                tif.write(tiles, **options)
    return path


def _level_shapes(height: int, width: int, tile: int, levels: int | None) -> list[tuple[int, int]]:
    """(H, W) per level, each half the one above (rounded up), stopping at ``levels`` or one tile."""
    if levels is not None and levels < 1:
        raise ValueError(f"levels must be at least 1, not {levels}")
    shapes = [(height, width)]
    while (len(shapes) < levels) if levels else (max(shapes[-1]) > tile):
        h, w = shapes[-1]
        if h == w == 1:
            break
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _ome_metadata(contig: bool, mpp: float | None, channels: int) -> dict:
    metadata = {"axes": "YXS" if contig else "CYX" if channels > 1 else "YX"}
    if mpp:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
    return metadata


def _tiles(read, shape: tuple[int, int, int], tile: int, contig: bool, below):
    """Yield one level's tiles in TIFF order; store each tile's 2x2 mean into the level ``below``."""
    channels, height, width = shape
    planes = [slice(None)] if contig else [slice(c, c + 1) for c in range(channels)]
    for plane in planes:
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                block = read(plane, slice(y, y + tile), slice(x, x + tile))
                if below is not None:
                    half = _halve(block)
                    below[plane, y // 2 : y // 2 + half.shape[1], x // 2 : x // 2 + half.shape[2]] = half
                yield np.moveaxis(block, 0, -1) if contig else block[0]


def _halve(block: np.ndarray) -> np.ndarray:
    """The 2x2 mean of a (C, h, w) block, the last row or column repeated when h or w is odd."""
    c, h, w = block.shape
    even = np.pad(block, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    mean = even.reshape(c, (h + 1) // 2, 2, (w + 1) // 2, 2).mean(axis=(2, 4))
    return (
        np.rint(mean).astype(block.dtype)
        if np.issubdtype(block.dtype, np.integer)
        else mean.astype(block.dtype)
    )


class MirroredSource(Source):
    """``image`` (C, h, w) repeated ``tiles_y`` x ``tiles_x`` times, every other copy mirrored.

    Mirroring makes every seam continuous, so the mosaic looks like one large
    tissue section rather than a grid of copies.
    """

    def __init__(self, image: np.ndarray, tiles_y: int, tiles_x: int):
        c, h, w = image.shape
        self.image, self.dtype = image, image.dtype
        self.shape = (1, c, h * tiles_y, w * tiles_x)

    def read(self, region: Region) -> np.ndarray:
        n, c, ys, xs = region
        _, h, w = self.image.shape
        rows, cols = _mirror(np.arange(ys.start, ys.stop), h), _mirror(np.arange(xs.start, xs.stop), w)
        return self.image[c][:, rows[:, None], cols[None, :]][None][n]


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Positions in a row of copies of length ``n``, alternately forward and mirrored."""
    index = index % (2 * n)
    return np.where(index < n, index, 2 * n - 1 - index)


def mosaic_slide(
    path_out: str | os.PathLike,
    tiles_x: int,
    tiles_y: int,
    source_svs: str | os.PathLike,
    tile: int = 256,
    compression: str | None = "jpeg",
) -> Path:
    """Build a large real-content test slide: the level 0 of ``source_svs``, mirrored into a
    ``tiles_y`` x ``tiles_x`` mosaic, written as a pyramidal OME-TIFF with the source's mpp.

    Only the (small) source region is held in memory; the mosaic is streamed tile
    by tile through ``write_pyramid``. JPEG keeps big mosaics small; pass
    ``compression="zlib"`` for a lossless one.
    """
    from bigpicture.io.slides import open_slide

    if tiles_x < 1 or tiles_y < 1:
        raise ValueError(f"tiles_x and tiles_y must be at least 1, not {tiles_x}, {tiles_y}")
    slide = open_slide(source_svs)
    mosaic = MirroredSource(slide[0], tiles_y, tiles_x)
    return write_pyramid(mosaic, path_out, mpp=slide.mpp, tile=tile, compression=compression)
