"""Every build of a prediction's rows made at once (``combos.combos_many``: one table per width, one
sort) equals each build made on its own as before (``classes._combos`` and the small grids'
``_small_combos``, tests/_old_node_combos.py): every field, dtype and shape, on batches of random
geometries (1D to 3D, mixed widths, repeated lengths so that rows repeat, flags, tile counts, with
and without the input's shape in the key), on tables cut into chunks, and on a window's lengths."""

from __future__ import annotations

import _old_node_combos as old
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_combos_fast import assert_same, geometries
from test_random_architectures import examples

from bigpicture.perf import combos
from bigpicture.perf.combos import combos_many
from bigpicture.perf.node_rows import lengths_of


def _check(builds: list) -> None:
    got = combos_many(builds)
    assert len(got) == len(builds)
    for g, b in zip(got, builds, strict=True):
        assert_same(g, old._combos(*b))
        if np.prod([len(f[1]) for f in b[0]]) <= old.SMALL_TABLE:
            assert_same(g, old._small_combos(*b))


@examples(300)
@given(st.lists(geometries(), min_size=1, max_size=12))
def test_builds_at_once_equal_each_alone(builds):
    _check(builds)


@examples(100)
@given(st.lists(geometries(), min_size=1, max_size=12), st.integers(1, 64))
def test_builds_in_chunks_equal_each_alone(builds, chunk):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(combos, "CHUNK", chunk)  # tables of a few builds each (one if it is larger)
        _check(builds)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("shaped", [False, True])
def test_windows_builds_equal_each_alone(nd, shaped):
    """Square and non-square grids of a window's geometries (lengths from its reach, as the planner's),
    many builds sharing their columns."""
    rng = np.random.default_rng(nd * 2 + shaped)
    builds = []
    for _ in range(60):
        window = tuple((int(rng.integers(1, 4)), int(rng.integers(1, 6))) for _ in range(nd))
        per_dim, lengths = [], []
        for d in range(nd):
            values = [((int(a), int(b)), bool(o), bool(c), 1)
                      for a, b, o, c in rng.integers(1, 9, (int(rng.integers(1, 12)), 4)) % [9, 9, 2, 2]]  # fmt: skip
            values = list(dict.fromkeys(values))  # distinct, as ``_Grid.features`` gives them
            tiles = rng.integers(1, 1000, len(values)).tolist()
            per_dim.append((tuple(range(len(values))), list(range(len(values))), tiles, values))
            lengths.append([lengths_of(window, v, d) for v in values])
        builds.append((per_dim, lengths, ["node", "x"], shaped))
    _check(builds)
