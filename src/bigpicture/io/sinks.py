"""Sinks: outputs written region by region, with a record of finished tiles for resuming.

``ZarrSink`` is a zarr array on disk. Each tile's write box is stored with
``sink[box.slices] = values``, then ``sink.mark_done(tile_index)``; a run that
stops part-way is resumed by opening the same path with the same arguments and
skipping the tiles for which ``sink.is_done(i)``. Choose ``chunks`` so that
write boxes are whole chunks (tile edges on chunk edges): then no two tiles
write the same chunk and concurrent writers never race. ``ZarrGroupSink`` is the
same for several outputs: a zarr group of named arrays (``sink[name][box] = values``)
with one record for all of them.

The record lives in the array's (or group's) attributes as ``{"bigpicture": {"meta": ...,
"done": [[start, stop], ...], "state": ..., "passes": [...]}}``; runs of finished indices are
stored as half-open ranges, so the record stays small when tiles finish roughly in order.
``passes`` (present once a run over several passes finished its first) holds what each finished
pass computed; ``done`` and ``state`` are about the pass in progress.
Writing data before marking it done makes a crash safe: at worst a finished tile
is computed again.

Several writers (the ranks of a distributed run, each writing its own tiles) open the store with
``writer="rank1of4"`` and so on: the attributes keep only the ``meta`` (written once, by whoever
creates the store), and each writer keeps its own ``done``, ``state`` and ``passes`` in a file
``.bigpicture-<writer>.json`` in the store, replaced atomically, so no writer overwrites another's.
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


class _Record:
    """The done record, the state of the pass in progress and the results of finished passes,
    kept in the attributes of ``self._node`` (a zarr array or group)."""

    path: Path

    def _load(self, node, writer: str | None = None) -> None:
        self._node, self._writer = node, writer
        record = node.attrs[RECORD]
        self.meta = record["meta"]
        if writer is not None:
            file = self._writer_file()
            record = json.loads(file.read_text()) if file.exists() else {"done": []}
        self.state = record.get("state")
        self._passes = list(record.get("passes", []))
        self._done = {i for start, stop in record["done"] for i in range(start, stop)}

    @property
    def done(self) -> frozenset[int]:
        """The finished tiles of the pass in progress."""
        return frozenset(self._done)

    @property
    def passes(self) -> tuple:
        """What each finished pass stored with ``finish_pass``, in order."""
        return tuple(self._passes)

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
        self._persist()

    def finish_pass(self, result) -> None:
        """Close the pass in progress, storing ``result`` (JSON-serialisable, what later passes
        need) in ``passes``; the next pass starts with no tile done and no state. Persists at once,
        in one write, so a crash leaves either the pass open or closed with its result."""
        self._passes.append(_as_json(result))
        self._done, self.state = set(), None
        self._persist()

    def _persist(self) -> None:
        record: dict = {"done": _ranges(self._done)}
        if self.state is not None:
            record["state"] = self.state
        if self._passes:
            record["passes"] = self._passes
        if self._writer is None:
            self._node.attrs[RECORD] = {"meta": self.meta, **record}
            return
        file = self._writer_file()  # the meta stays in the attributes
        temporary = file.with_name(file.name + ".tmp")
        temporary.write_text(json.dumps(record))
        os.replace(temporary, file)  # atomic: a killed writer leaves the old record or the new one

    def _writer_file(self) -> Path:
        return self.path / f".{RECORD}-{self._writer}.json"


class _ArrayWriter:
    """Region writes into ``self.array``, checked against the region's shape."""

    array = None
    path: Path

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self.array.chunks)

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


class ZarrSink(_ArrayWriter, _Record):
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
        writer: str | None = None,
    ):
        zarr = optional_import("zarr", "ZarrSink")
        self.path = Path(path).expanduser()
        spec = _spec(shape, dtype, chunks)
        stored_meta = None if meta is None else _as_json(meta)
        _start_over(self.path, overwrite)
        if self.path.exists():
            self.array = self._reopen(zarr, spec, stored_meta)
        else:
            self.array = zarr.open_array(
                str(self.path), mode="w-", shape=spec[0], chunks=spec[2], dtype=spec[1], fill_value=0
            )
            self.array.attrs[RECORD] = {"meta": stored_meta or {}, "done": []}
        self._load(self.array, writer)

    def _reopen(self, zarr, spec, meta):
        try:
            array = zarr.open_array(str(self.path), mode="r+")
        except Exception as exc:
            if _is_group_sink(zarr, self.path):
                raise TilingError(
                    f"{self.path} holds several output arrays of another run (a zarr group), and this run "
                    "writes one; write to a new path, or pass overwrite=True to start over"
                ) from exc
            raise TilingError(
                f"{self.path} exists and is not a zarr array ({exc}); choose another output path"
            ) from exc
        if RECORD not in array.attrs:
            raise TilingError(
                f"{self.path} exists and was not written by ZarrSink; choose another output path"
            )
        stored = {"shape": tuple(array.shape), "dtype": np.dtype(array.dtype), "chunks": tuple(array.chunks)}
        wanted = dict(zip(("shape", "dtype", "chunks"), spec, strict=True))
        _refuse_mismatch(self.path, stored, wanted, array.attrs[RECORD]["meta"], meta)
        return array

    def __repr__(self) -> str:
        return f"ZarrSink({str(self.path)!r}, shape={self.shape}, dtype={self.dtype}, done={len(self._done)})"


class ZarrMember(_ArrayWriter):
    """One array of a ``ZarrGroupSink``: ``member[box] = values``; ``member.array`` is the zarr array."""

    def __init__(self, path: Path, array):
        self.path, self.array = path, array

    def __repr__(self) -> str:
        return f"ZarrMember({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


class ZarrGroupSink(_Record):
    """Several outputs in one zarr group at ``path``, one array per name, with one done record.

    ``arrays`` maps each name to ``(shape, dtype, chunks)``. ``sink[name]`` writes and reads one
    array (``sink[name].array`` is the zarr array, also at ``path/name``); ``mark_done``, ``state``
    and ``meta`` are as for ``ZarrSink``, kept in the group's attributes. Reopening checks the names,
    every array's shape, dtype and chunks, and ``meta``, and refuses a mismatch.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        arrays: dict[str, tuple],
        meta: dict | None = None,
        overwrite: bool = False,
        writer: str | None = None,
    ):
        zarr = optional_import("zarr", "ZarrGroupSink")
        self.path = Path(path).expanduser()
        specs = {str(name): _spec(*spec) for name, spec in arrays.items()}
        bad = [n for n in specs if not n or "/" in n or n.startswith(".") or n.startswith("__")]
        if not specs or bad:
            raise ValueError(f"array names must be non-empty, without '/', not start with '.' or '__': {bad}")
        stored_meta = None if meta is None else _as_json(meta)
        _start_over(self.path, overwrite)
        if self.path.exists():
            self.group = self._reopen(zarr, specs, stored_meta)
        else:
            self.group = zarr.open_group(str(self.path), mode="w-")
            for name, (shape, dtype, chunks) in specs.items():
                self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
            self.group.attrs[RECORD] = {"meta": stored_meta or {}, "done": []}
        self._members = {n: ZarrMember(self.path / n, self.group[n]) for n in specs}
        self._load(self.group, writer)

    def _reopen(self, zarr, specs: dict, meta):
        try:
            group = zarr.open_group(str(self.path), mode="r+")
        except Exception as exc:
            kind = (
                "one output array of another run" if _is_array_sink(zarr, self.path) else "not a zarr group"
            )
            raise TilingError(
                f"{self.path} exists and is {kind}, and this run writes {len(specs)} arrays "
                f"({', '.join(specs)}) into a zarr group; write to a new path, or pass overwrite=True "
                "to start over"
            ) from exc
        if RECORD not in group.attrs:
            raise TilingError(
                f"{self.path} exists and was not written by ZarrGroupSink; choose another output path"
            )
        present = {n: group[n] for n in group.array_keys()}
        stored, wanted = {"arrays": sorted(present)}, {"arrays": sorted(specs)}
        for name, array in present.items():
            stored.update(zip((f"{name}.shape", f"{name}.dtype", f"{name}.chunks"), _spec_of(array)))
        for name, spec in specs.items():
            wanted.update(zip((f"{name}.shape", f"{name}.dtype", f"{name}.chunks"), spec))
        _refuse_mismatch(self.path, stored, wanted, group.attrs[RECORD]["meta"], meta)
        return group

    def __getitem__(self, name: str) -> ZarrMember:
        return self._members[name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._members)

    @property
    def arrays(self) -> dict:
        """The zarr arrays by name."""
        return {n: m.array for n, m in self._members.items()}

    def __repr__(self) -> str:
        arrays = ", ".join(f"{n}: {m.shape}" for n, m in self._members.items())
        return f"ZarrGroupSink({str(self.path)!r}, {{{arrays}}}, done={len(self._done)})"


def _spec(shape, dtype, chunks) -> tuple:
    shape, chunks, dtype = tuple(int(n) for n in shape), tuple(int(n) for n in chunks), np.dtype(dtype)
    if len(chunks) != len(shape) or min(chunks, default=1) < 1:
        raise ValueError(f"chunks {chunks} must be one positive size per axis of shape {shape}")
    return shape, dtype, chunks


def _spec_of(array) -> tuple:
    return tuple(array.shape), np.dtype(array.dtype), tuple(array.chunks)


def _start_over(path: Path, overwrite: bool) -> None:
    if overwrite and path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _is_group_sink(zarr, path: Path) -> bool:
    try:
        return RECORD in zarr.open_group(str(path), mode="r").attrs
    except Exception:
        return False


def _is_array_sink(zarr, path: Path) -> bool:
    try:
        return RECORD in zarr.open_array(str(path), mode="r").attrs
    except Exception:
        return False


def _refuse_mismatch(path: Path, stored: dict, wanted: dict, stored_meta: dict, meta: dict | None) -> None:
    if meta is not None:
        stored.update(_prefixed(stored_meta))
        wanted.update(_prefixed(meta))
    differ = [
        f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}"
        for k in sorted(stored.keys() | wanted.keys())
        if stored.get(k) != wanted.get(k)
    ]
    if differ:
        raise TilingError(
            f"{path} holds a run with different arguments ({'; '.join(differ)}). Resume with the "
            "same arguments, or write to a new path, or pass overwrite=True to start over"
        )


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
