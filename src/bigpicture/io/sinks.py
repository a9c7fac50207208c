"""Sinks: outputs written region by region, with a record of finished tiles for resuming.

``ZarrSink`` is a zarr array on disk. Each tile's write box is stored with
``sink[box.slices] = values``, then ``sink.mark_done(tile_index)``; a run that
stops part-way is resumed by opening the same path with the same arguments and
skipping the tiles for which ``sink.is_done(i)``. Choose ``chunks`` so that
write boxes are whole chunks (tile edges on chunk edges): then no two tiles
write the same chunk and concurrent writers never race.

The record lives in the array's attributes as ``{"bigpicture": {"meta": ...,
"done": [[start, stop], ...], "state": ...}}``; runs of finished indices are stored as
half-open ranges, so the record stays small when tiles finish roughly in order.
Writing data before marking it done makes a crash safe: at worst a finished tile
is computed again. The record is rewritten by the process that marks tiles, so
mark tiles from one process (e.g. rank 0) in distributed runs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from bigpicture.errors import TilingError
from bigpicture.io.sources import normalise_key, optional_import, region_shape

RECORD = "bigpicture"


class ZarrSink:
    """A zarr array at ``path`` written region by region, with a persistent done record.

    ``meta`` holds the arguments that produced the output (model, tile, level,
    ...), JSON-serialisable. Reopening an existing store checks shape, dtype,
    chunks and ``meta`` (unless ``meta`` is None) and refuses a mismatch, so a
    resumed run cannot mix outputs of different settings; ``overwrite=True``
    deletes the store and starts over.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: tuple[int, ...],
        dtype,
        chunks: tuple[int, ...],
        meta: dict | None = None,
        overwrite: bool = False,
    ):
        zarr = optional_import("zarr", "ZarrSink")
        self.path = Path(path).expanduser()
        shape, chunks, dtype = tuple(int(n) for n in shape), tuple(int(n) for n in chunks), np.dtype(dtype)
        if len(chunks) != len(shape) or min(chunks, default=1) < 1:
            raise ValueError(f"chunks {chunks} must be one positive size per axis of shape {shape}")
        stored_meta = None if meta is None else _as_json(meta)
        if overwrite and self.path.exists():
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        if self.path.exists():
            self.array = self._reopen(zarr, shape, dtype, chunks, stored_meta)
        else:
            self.array = zarr.open_array(
                str(self.path), mode="w-", shape=shape, chunks=chunks, dtype=dtype, fill_value=0
            )
            self.array.attrs[RECORD] = {"meta": stored_meta or {}, "done": []}
        record = self.array.attrs[RECORD]
        self.meta, self.state = record["meta"], record.get("state")
        self._done = {i for start, stop in record["done"] for i in range(start, stop)}

    def _reopen(self, zarr, shape, dtype, chunks, meta):
        try:
            array = zarr.open_array(str(self.path), mode="r+")
        except Exception as exc:
            raise TilingError(
                f"{self.path} exists and is not a zarr array ({exc}); choose another output path"
            ) from exc
        if RECORD not in array.attrs:
            raise TilingError(
                f"{self.path} exists and was not written by ZarrSink; choose another output path"
            )
        stored = {"shape": tuple(array.shape), "dtype": np.dtype(array.dtype), "chunks": tuple(array.chunks)}
        wanted = {"shape": shape, "dtype": dtype, "chunks": chunks}
        if meta is not None:
            stored.update(_prefixed(array.attrs[RECORD]["meta"]))
            wanted.update(_prefixed(meta))
        differ = [
            f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}"
            for k in sorted(stored.keys() | wanted.keys())
            if stored.get(k) != wanted.get(k)
        ]
        if differ:
            raise TilingError(
                f"{self.path} holds a run with different arguments ({'; '.join(differ)}). Resume with the "
                "same arguments, or write to a new path, or pass overwrite=True to start over"
            )
        return array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self.array.chunks)

    @property
    def done(self) -> frozenset[int]:
        return frozenset(self._done)

    def __setitem__(self, key, value) -> None:
        region, drop = normalise_key(key, self.shape)
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        value = np.asarray(value)
        expected = region_shape(region)
        if value.ndim and not drop and value.shape != expected:
            raise TilingError(
                f"{self.path}: writing values of shape {value.shape} into a region of shape {expected}"
            )
        self.array[key if drop else region] = value

    def __getitem__(self, key) -> np.ndarray:
        return np.asarray(self.array[key])

    def is_done(self, index: int) -> bool:
        return int(index) in self._done

    def mark_done(self, index: int, state=None) -> None:
        """Record that tile ``index`` is written; persists at once.

        ``state`` (JSON-serialisable, e.g. streamed reductions so far) is stored in the same
        write as the done record, so the two always agree after a crash; ``sink.state`` reads it.
        """
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise TypeError(f"tile indices are non-negative integers, not {index!r}")
        if int(index) in self._done and state is None:
            return
        self._done.add(int(index))
        if state is not None:
            self.state = _as_json(state)
        record = {"meta": self.meta, "done": _ranges(self._done)}
        if self.state is not None:
            record["state"] = self.state
        self.array.attrs[RECORD] = record

    def __repr__(self) -> str:
        return f"ZarrSink({str(self.path)!r}, shape={self.shape}, dtype={self.dtype}, done={len(self._done)})"


def _as_json(meta: dict) -> dict:
    try:
        return json.loads(json.dumps(meta))
    except TypeError as exc:
        raise TypeError(
            f"ZarrSink meta and state must be JSON-serialisable (numbers, strings, lists, dicts): {exc}"
        ) from exc


def _prefixed(meta: dict) -> dict:
    return {f"meta[{k!r}]": v for k, v in meta.items()}


def _ranges(indices: set[int]) -> list[list[int]]:
    """Sorted indices as half-open runs: {0, 1, 2, 5} -> [[0, 3], [5, 6]]."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs
