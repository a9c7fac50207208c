"""ZarrSink: region writes round-trip, the done record survives reopening, mismatched runs are refused."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bigpicture.errors import TilingError
from bigpicture.io import ZarrSink, as_source
from bigpicture.io.sinks import _ranges

zarr = pytest.importorskip("zarr")

SHAPE, CHUNKS = (1, 2, 20, 30), (1, 2, 10, 10)
META = {"tile": [10, 10], "model": "unet", "level": 0}


def tile_boxes():
    """The write boxes of a 2 x 3 grid of 10 x 10 tiles, aligned with the chunks."""
    return [
        (slice(0, 1), slice(0, 2), slice(y, y + 10), slice(x, x + 10)) for y in (0, 10) for x in (0, 10, 20)
    ]


def test_round_trip_and_done_record(tmp_path):
    expected = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    sink = ZarrSink(tmp_path / "out.zarr", SHAPE, np.float32, CHUNKS, meta=META)
    for i, box in enumerate(tile_boxes()[:4]):
        sink[box] = torch.from_numpy(expected[box]) if i % 2 else expected[box]
        sink.mark_done(i)
    assert sink.done == {0, 1, 2, 3} and sink.is_done(3) and not sink.is_done(4)

    resumed = ZarrSink(tmp_path / "out.zarr", SHAPE, "float32", CHUNKS, meta=dict(META))
    assert resumed.done == {0, 1, 2, 3} and resumed.meta == META
    for i, box in enumerate(tile_boxes()):
        if not resumed.is_done(i):
            resumed[box] = expected[box]
            resumed.mark_done(i)
    np.testing.assert_array_equal(resumed[:], expected)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[:], expected)
    np.testing.assert_array_equal(as_source(resumed.array)[0, 1, 3:17], expected[0, 1, 3:17])
    assert ZarrSink(tmp_path / "out.zarr", SHAPE, "float32", CHUNKS).done == set(range(6))


def test_mismatched_run_is_refused(tmp_path):
    path = tmp_path / "out.zarr"
    ZarrSink(path, SHAPE, np.float32, CHUNKS, meta=META).mark_done(0)
    with pytest.raises(
        TilingError, match=r"meta\['tile'\]: stored \[10, 10\], now \[12, 12\].*overwrite=True"
    ):
        ZarrSink(path, SHAPE, np.float32, CHUNKS, meta={**META, "tile": [12, 12]})
    with pytest.raises(TilingError, match=r"shape: stored \(1, 2, 20, 30\), now \(1, 2, 20, 31\)"):
        ZarrSink(path, (1, 2, 20, 31), np.float32, CHUNKS, meta=META)
    with pytest.raises(TilingError, match="dtype"):
        ZarrSink(path, SHAPE, np.float16, CHUNKS, meta=META)
    fresh = ZarrSink(path, SHAPE, np.float32, CHUNKS, meta={**META, "tile": [12, 12]}, overwrite=True)
    assert fresh.done == frozenset() and fresh.meta["tile"] == [12, 12]


def test_foreign_path_is_refused(tmp_path):
    (tmp_path / "notes.zarr").mkdir()
    (tmp_path / "notes.zarr" / "readme.txt").write_text("mine")
    with pytest.raises(TilingError, match="notes.zarr exists and is not a zarr array"):
        ZarrSink(tmp_path / "notes.zarr", SHAPE, np.float32, CHUNKS)
    zarr.open_array(str(tmp_path / "other.zarr"), mode="w", shape=SHAPE, dtype="f4")
    with pytest.raises(TilingError, match="not written by ZarrSink"):
        ZarrSink(tmp_path / "other.zarr", SHAPE, np.float32, CHUNKS)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="chunks"):
        ZarrSink(tmp_path / "a.zarr", SHAPE, np.float32, (10, 10))
    with pytest.raises(TypeError, match="JSON"):
        ZarrSink(tmp_path / "b.zarr", SHAPE, np.float32, CHUNKS, meta={"model": object()})
    sink = ZarrSink(tmp_path / "c.zarr", SHAPE, np.float32, CHUNKS)
    with pytest.raises(TypeError, match="non-negative integers"):
        sink.mark_done((0, 1))
    with pytest.raises(TilingError, match=r"shape \(1, 2, 5, 5\) into a region of shape \(1, 2, 10, 10\)"):
        sink[tile_boxes()[0]] = np.zeros((1, 2, 5, 5))


@given(st.sets(st.integers(0, 200)))
def test_done_ranges_round_trip(indices):
    runs = _ranges(indices)
    assert {i for start, stop in runs for i in range(start, stop)} == indices
    assert all(a[1] < b[0] for a, b in zip(runs, runs[1:], strict=False))  # disjoint, sorted, not touching
