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


# -- several arrays in one group, and runs over several passes -----------------------------------

SPECS = {"0": (SHAPE, np.float32, CHUNKS), "aux": ((1, 3, 10, 15), np.float16, (1, 3, 5, 5))}


def test_group_round_trip_and_done_record(tmp_path):
    from bigpicture.io.sinks import ZarrGroupSink

    rng = np.random.default_rng(1)
    expected = {n: rng.standard_normal(shape).astype(dtype) for n, (shape, dtype, _) in SPECS.items()}
    sink = ZarrGroupSink(tmp_path / "out.zarr", SPECS, meta=META)
    for i, box in enumerate(tile_boxes()[:4]):
        half = tuple(slice(b.start // 2, b.stop // 2) if d >= 2 else slice(0, 3) if d == 1 else b
                     for d, b in enumerate(box))  # fmt: skip
        sink["0"][box] = expected["0"][box]
        sink["aux"][half] = torch.from_numpy(expected["aux"][half])
        sink.mark_done(i, state={"sum": i})
    assert sink.names == ("0", "aux") and sink["aux"].chunks == (1, 3, 5, 5)

    resumed = ZarrGroupSink(tmp_path / "out.zarr", dict(SPECS), meta=dict(META))
    assert resumed.done == {0, 1, 2, 3} and resumed.state == {"sum": 3} and resumed.passes == ()
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    np.testing.assert_array_equal(group["0"][:, :, :10], expected["0"][:, :, :10])
    np.testing.assert_array_equal(resumed["aux"][:, :, :5, :10], expected["aux"][:, :, :5, :10])
    assert resumed.arrays["aux"].dtype == np.float16 and "passes" not in group.attrs["bigpicture"]


def test_group_mismatch_and_array_or_group_are_refused(tmp_path):
    from bigpicture.io.sinks import ZarrGroupSink

    path = tmp_path / "out.zarr"
    ZarrGroupSink(path, SPECS, meta=META).mark_done(0)
    with pytest.raises(TilingError, match=r"aux.chunks: stored \(1, 3, 5, 5\), now \(1, 3, 10, 5\)"):
        ZarrGroupSink(path, {**SPECS, "aux": ((1, 3, 10, 15), np.float16, (1, 3, 10, 5))}, meta=META)
    with pytest.raises(TilingError, match=r"arrays: stored \['0', 'aux'\], now \['0'\]"):
        ZarrGroupSink(path, {"0": SPECS["0"]}, meta=META)
    with pytest.raises(TilingError, match=r"meta\['tile'\]"):
        ZarrGroupSink(path, SPECS, meta={**META, "tile": [5, 5]})
    with pytest.raises(TilingError, match="several output arrays of another run"):
        ZarrSink(path, SHAPE, np.float32, CHUNKS, meta=META)
    ZarrSink(tmp_path / "one.zarr", SHAPE, np.float32, CHUNKS, meta=META)
    with pytest.raises(TilingError, match="one output array of another run"):
        ZarrGroupSink(tmp_path / "one.zarr", SPECS, meta=META)
    assert ZarrGroupSink(path, {"0": SPECS["0"]}, meta=META, overwrite=True).done == frozenset()
    with pytest.raises(ValueError, match="array names"):
        ZarrGroupSink(tmp_path / "bad.zarr", {"a/b": SPECS["0"]})


def test_finished_passes_are_kept_in_the_record(tmp_path):
    path = tmp_path / "out.zarr"
    sink = ZarrSink(path, SHAPE, np.float32, CHUNKS, meta=META)
    for i in range(6):
        sink.mark_done(i, state={"partial": i})
    sink.finish_pass({"reduced": [1.5]})
    assert sink.done == frozenset() and sink.state is None and sink.passes == ({"reduced": [1.5]},)
    sink.mark_done(0, state={"partial": 10})
    reopened = ZarrSink(path, SHAPE, np.float32, CHUNKS, meta=META)
    assert reopened.passes == ({"reduced": [1.5]},) and reopened.done == {0}
    assert reopened.state == {"partial": 10}
