"""``unique_rows.unique_rows`` (columns packed into few keys, sorted once) numbers a table's distinct
rows as ``np.unique(table, axis=0, return_index=True, return_inverse=True)`` does: random tables of
small, wide and extreme values (int64's ends, columns spanning more than int64 can shift), constant
columns, repeated rows, and the planner's tables (products of lengths, flags, the build's number)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_unique_rows import _check

from bigpicture.perf.unique_rows import unique_rows

_EXTREME = st.sampled_from([-(2**63), -(2**63) + 1, -1, 0, 1, 2**62, 2**63 - 2, 2**63 - 1])
_TABLES = st.tuples(
    st.integers(1, 600), st.integers(1, 9), st.sampled_from([0, 1, 2, 5, 2**20, 2**40, 2**62])
).flatmap(lambda a: hnp.arrays(np.int64, (a[0], a[1]), elements=st.integers(-a[2], a[2]) | _EXTREME))


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(_TABLES)
def test_unique_rows_equal_numpys(table):
    _check(unique_rows(table), table)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.integers(1, 2000), st.integers(1, 8), st.integers(0, 2**16), st.integers(1, 2**31))
def test_unique_rows_with_repeats(rows, columns, seed, high):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, high, (max(rows // 4, 1), columns), dtype=np.int64)
    table = base[rng.integers(0, len(base), rows)]
    if columns > 2:
        table[:, 1] = 7  # a constant column
        table[:, 2] = rng.integers(0, 2, rows)  # a flag
    _check(unique_rows(table), table)


@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (5, 1), (3, 0)])
def test_unique_rows_of_edge_shapes(shape):
    table = np.zeros(shape, dtype=np.int64)
    _check(unique_rows(table), table)
