"""Sources: lazy, channel-first images that the engine reads one region at a time.

A *source* is any object with ``.shape`` ``(N, C, *spatial)``, ``.dtype`` (a numpy
dtype) and ``__getitem__(tuple_of_slices) -> numpy.ndarray``. numpy arrays, memmaps,
zarr arrays and h5py datasets in that layout already are sources; ``as_source``
wraps everything else (tensors, paths, slides, volumes) and adds a per-region
``transform``.

    image  |..........................................|
    region          [y0, y1) x [x0, x1)    <- the only pixels read from disk
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bigpicture.errors import TilingError

Region = tuple[slice, ...]


def optional_import(name: str, needed_for: str):
    """Import an optional I/O library, or say which extra installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"{needed_for} needs the optional package {name!r}: "
            f"pip install 'bigpicture[io]' or pip install {name}"
        ) from exc


def existing_path(path: str | os.PathLike) -> Path:
    """The path as a Path, or FileNotFoundError naming it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory; check the path (cwd is {Path.cwd()})")
    return path


def normalise_key(key, shape: tuple[int, ...]) -> tuple[Region, tuple]:
    """Resolve an index into contiguous in-bounds slices, one per axis.

    Slices are clipped like numpy's; integers select one position and are dropped
    from the result by the returned second index (empty when there are none).
    """
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        at = key.index(Ellipsis)
        key = key[:at] + (slice(None),) * (len(shape) - len(key) + 1) + key[at + 1 :]
    if len(key) > len(shape):
        raise IndexError(f"{len(key)} indices for a source of shape {shape}")
    key = key + (slice(None),) * (len(shape) - len(key))
    region, drop = [], []
    for k, n in zip(key, shape, strict=True):
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step != 1:
                raise IndexError(f"sources read contiguous regions: step {k.step} in {k} is not supported")
            region.append(slice(start, max(start, stop)))
            drop.append(slice(None))
        elif isinstance(k, (int, np.integer)):
            i = int(k) + n if k < 0 else int(k)
            if not 0 <= i < n:
                raise IndexError(f"index {k} is out of bounds for an axis of size {n} (shape {shape})")
            region.append(slice(i, i + 1))
            drop.append(0)
        else:
            raise IndexError(f"sources take slices and integers, not {type(k).__name__} ({k!r})")
    return tuple(region), (tuple(drop) if 0 in drop else ())


def region_shape(region: Region) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in region)


class Source:
    """Base of bigpicture's sources: set ``shape`` and ``dtype``, implement ``read``.

    ``read`` gets one in-bounds slice per axis, never an empty region, and returns exactly it;
    ``__getitem__`` resolves user indices, checks the result and adds context to
    errors. ``hint`` says what to do when a read fails.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    hint = ""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def read(self, region: Region) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, key) -> np.ndarray:
        region, drop = normalise_key(key, self.shape)
        if 0 in region_shape(region):  # readers differ on empty regions; none is needed
            return np.zeros(region_shape(region), self.dtype)[drop]
        try:
            out = np.asarray(self.read(region))
        except (TilingError, KeyboardInterrupt):
            raise
        except Exception as exc:
            where = ", ".join(f"{s.start}:{s.stop}" for s in region)
            raise TilingError(f"{self!r}: reading region [{where}] failed: {exc}. {self.hint}") from exc
        assert out.shape == region_shape(region), (self, out.shape, region)
        if not out.flags.writeable:  # e.g. a view of a read-only memory map: torch wants to own its tensors
            out = out.copy()
        return out[drop] if drop else out

    def identity(self) -> dict:
        """What identifies this input in a resumable run's record (JSON): kind, shape, dtype."""
        return {"kind": type(self).__name__, "shape": list(self.shape), "dtype": str(self.dtype)}

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[()]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


class FileSource(Source):
    """A source read from ``path`` through a handle opened on first use.

    The handle is not pickled: a copy sent to another process reopens the file.
    """

    hint = "The file may be corrupted or truncated: check that it opens in a viewer, or copy it again."
    _handle = None

    def __init__(self, path: Path):
        self.path = path

    def open(self):
        raise NotImplementedError

    @property
    def handle(self):
        if self._handle is None:
            self._handle = self.open()
        return self._handle

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_handle"}

    def identity(self) -> dict:
        out = {**super().identity(), "path": str(self.path.resolve())}
        if self.path.is_file():
            out["bytes"] = self.path.stat().st_size
        if getattr(self, "level", None) is not None:
            out["level"] = int(self.level)
        return out

    def probe(self) -> None:
        """Read one pixel at each spatial corner, so that a broken file fails now."""
        spatial = self.shape[2:]
        for corner in np.ndindex(*(2,) * len(spatial)):
            at = [n - 1 if c else 0 for c, n in zip(corner, spatial, strict=True)]
            self[(slice(0, 1), slice(0, 1), *(slice(a, a + 1) for a in at))]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


class ArraySource(Source):
    """Any array-like with ``shape``, ``dtype`` and slicing: numpy, memmap, zarr, h5py, dask.

    Regions of in-memory arrays are copied, so a model that changes its input in
    place cannot alter the pixels that a neighbouring tile reads as its halo.
    """

    def __init__(self, array):
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)

    def read(self, region: Region) -> np.ndarray:
        out = self.array[region]
        return np.array(out) if isinstance(self.array, np.ndarray) else np.asarray(out)

    def identity(self) -> dict:
        where = getattr(self.array, "filename", None) or getattr(self.array, "store_path", None)
        out = {**super().identity(), "array": type(self.array).__name__}
        return {**out, "at": str(where)} if where else out

    def __repr__(self) -> str:
        return f"ArraySource({type(self.array).__name__}, shape={self.shape}, dtype={self.dtype})"


class TensorSource(Source):
    """A torch tensor, read region by region into numpy (detached, copied to the CPU)."""

    def __init__(self, tensor: torch.Tensor):
        try:
            self.dtype = torch.empty(0, dtype=tensor.dtype).numpy().dtype
        except TypeError as exc:
            raise TilingError(f"a {tensor.dtype} tensor has no numpy dtype; pass x.float() instead") from exc
        self.tensor = tensor.detach()
        self.shape = tuple(tensor.shape)

    def read(self, region: Region) -> np.ndarray:
        return self.tensor[region].cpu().numpy().copy()


class TransformedSource(Source):
    """``source`` with ``transform`` applied to each region read.

    The transform must be *pointwise in space*: the value at a pixel may depend on
    all channels of that pixel, never on other pixels, and the shape must not
    change (dtype conversion, fixed intensity scaling, colour transforms). Then
    transforming each region equals transforming the whole image first. Regions
    are read with all channels so that channel-mixing transforms stay exact. A
    normalisation by each region's own statistics is not pointwise; a cheap check
    at construction catches the obvious cases.
    """

    def __init__(self, source, transform: Callable[[np.ndarray], np.ndarray]):
        self.source, self.transform = source, transform
        self.shape = tuple(source.shape)
        self.dtype = self._apply(np.asarray(source[self._block(1)])).dtype
        self._check_pointwise()

    def _block(self, size: int) -> Region:
        """A region of up to ``size`` pixels per spatial axis at the image centre, all channels."""
        starts = [max(0, n // 2 - size // 2) for n in self.shape[2:]]
        spatial = [slice(a, a + size) for a in starts]
        return (slice(0, 1), slice(None), *spatial)

    def _apply(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(self.transform(x))
        if y.shape != x.shape:
            raise TilingError(
                f"transform {self.transform!r} changed a region's shape from {x.shape} to {y.shape}; "
                "a source transform must be pointwise and keep the shape (resize inside the model instead)"
            )
        return y

    def _check_pointwise(self) -> None:
        block = np.asarray(self.source[self._block(4)])
        if block.size == 0:
            return
        first = (slice(None), slice(None), *(slice(0, 1),) * (block.ndim - 2))
        whole, alone = self._apply(block)[first], self._apply(block[first])
        if not np.allclose(whole, alone, equal_nan=True):
            raise TilingError(
                f"transform {self.transform!r} is not pointwise: a pixel's value changed with the region "
                "read around it (a normalisation by the region's own mean/std?). Tiled results would not "
                "equal untiled ones; normalise with fixed statistics computed once over the image instead"
            )

    def read(self, region: Region) -> np.ndarray:
        n, c, *spatial = region
        return self._apply(np.asarray(self.source[(n, slice(None), *spatial)]))[:, c]

    def identity(self) -> dict:
        t = self.transform
        if not inspect.isroutine(t) and type(t).__repr__ is not object.__repr__:
            name = repr(t)  # e.g. a dataclass: its values tell two transforms apart
        else:
            name = getattr(t, "__qualname__", type(t).__qualname__)
        inner = (self.source if isinstance(self.source, Source) else ArraySource(self.source)).identity()
        return {**super().identity(), "transform": name, "source": inner}

    def __repr__(self) -> str:
        return f"TransformedSource({self.source!r}, {self.transform!r})"


Opener = Callable[[Path], "Source"]
_OPENERS: list[tuple[Callable[[Path], bool], Opener]] = []
_FALLBACKS: list[tuple[Callable[[Path], bool], Opener]] = []


def register_opener(matches: Callable[[Path], bool], opener: Opener, fallback: bool = False) -> None:
    """Let ``open_path`` open the files or folders that ``matches(path)`` accepts with ``opener(path)``.

    Openers are tried in the order registered; ``fallback`` ones (e.g. slides: any file) after all
    others. ``bigpicture.io`` registers zarr, .npy, volumes (NIfTI, DICOM folders) and slides."""
    (_FALLBACKS if fallback else _OPENERS).append((matches, opener))


def open_path(path: str | os.PathLike):
    """A source for a file or folder, chosen by its name: NIfTI, DICOM, zarr, .npy, or a slide."""
    path = existing_path(path)
    for matches, opener in _OPENERS + _FALLBACKS:
        if matches(path):
            return opener(path)
    raise TilingError(
        f"no reader for {path}: bigpicture.io opens slides and TIFF files, NIfTI, DICOM folders, zarr and "
        ".npy; register another with bigpicture.io.sources.register_opener(matches, opener)"
    )


def _is_zarr(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".zarr") or (path / "zarr.json").exists() or (path / ".zarray").exists()


def _open_zarr(path: Path) -> Source:
    zarr = optional_import("zarr", "reading a zarr array")
    try:
        return ArraySource(zarr.open_array(str(path), mode="r"))
    except Exception:
        arrays = _group_arrays(zarr, path)
        if not arrays:
            raise
        raise TilingError(
            f"{path} is a zarr group of {len(arrays)} arrays ({', '.join(arrays)}), not one image; "
            f"pass one of them, e.g. {path / arrays[0]}"
        ) from None


def _group_arrays(zarr, path: Path) -> list[str]:
    """The names of the arrays in the zarr group at ``path`` (none if it is not a group)."""
    try:
        return sorted(zarr.open_group(str(path), mode="r").array_keys())
    except Exception:
        return []


def as_source(obj, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Source:
    """A source for ``obj``, with ``transform`` applied to each region read.

    ``obj`` may be a source, a torch tensor, any array-like with ``shape``,
    ``dtype`` and slicing (numpy, memmap, zarr, h5py, dask), or a path (see
    ``open_path``). Arrays must already be channel-first, ``(N, C, *spatial)``.
    ``transform`` must be pointwise in space; see ``TransformedSource``.
    """
    if isinstance(obj, Source):
        source = obj
    elif isinstance(obj, torch.Tensor):
        source = TensorSource(obj)
    elif isinstance(obj, (str, os.PathLike)):
        source = open_path(obj)
    elif all(hasattr(obj, a) for a in ("shape", "dtype", "__getitem__")):
        source = ArraySource(obj)
    else:
        raise TypeError(
            f"cannot read a {type(obj).__name__} as a source: pass an array-like with shape, dtype and "
            "slicing (numpy, zarr, h5py, dask), a torch tensor, or a path to a slide or volume"
        )
    if source.ndim < 3:
        raise TilingError(
            f"a source must be channel-first (N, C, *spatial), got shape {source.shape}; "
            "for an (H, W, C) image pass np.moveaxis(image, -1, 0)[None]"
        )
    return source if transform is None else TransformedSource(source, transform)


register_opener(_is_zarr, _open_zarr)
register_opener(
    lambda path: path.name.lower().endswith(".npy"), lambda path: ArraySource(np.load(path, mmap_mode="r"))
)
