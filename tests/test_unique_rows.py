"""The planner's cheaper bookkeeping equals what it replaced, bit for bit: distinct rows of a node's
table (``classes._unique_rows``, ``_unique_small`` as they were: tests/_old_node_combos.py) against ``np.unique``, and the walk's groups of
rows of one structure (``walk.structures``) against renumbering with ``np.unique`` after each step."""

from __future__ import annotations

import numpy as np
import pytest
from _old_node_combos import SMALL_TABLE, _unique_rows, _unique_small
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bigpicture.perf.steps import Step
from bigpicture.perf.walk import structure, structures


def _reference(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, first, inverse = np.unique(table, axis=0, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def _check(got, table):
    want = _reference(table)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w)


_TABLES = st.tuples(st.integers(1, 1200), st.integers(1, 9), st.sampled_from([2, 5, 2**40])).flatmap(
    lambda a: hnp.arrays(np.int64, (a[0], a[1]), elements=st.integers(-a[2], a[2]))
)


@settings(max_examples=150, deadline=None)
@given(_TABLES)
def test_unique_rows_equal_numpys(table):
    _check(_unique_rows(table), table)
    _check(_unique_small(table), table)


@pytest.mark.parametrize("rows", [1, 7, SMALL_TABLE, SMALL_TABLE + 1, 5000])
def test_unique_rows_of_tables_with_repeats(rows):
    rng = np.random.default_rng(rows)
    base = rng.integers(0, 2**62, (max(rows // 3, 1), 6), dtype=np.int64)
    table = base[rng.integers(0, len(base), rows)]
    table[:, 2] = rng.integers(0, 2, rows)  # flags as the planner's tables have them
    _check(_unique_rows(table), table)


def _old_structures(steps, index, rows):
    """``walk.row_peaks``'s numbering before ``structures``: renumbered after every step."""
    which = np.zeros(rows, dtype=np.int64)
    for step, pick in zip(steps, index, strict=True):
        _, which = np.unique(which * 16 + structure(step)[pick], return_inverse=True)
    return which.reshape(-1)


def _step(flags: np.ndarray) -> Step:
    aliases, keeps, saves_in, saves_out = flags.T
    zero = np.zeros(len(flags), dtype=np.int64)
    return Step(
        None, (), zero, aliases=aliases, keeps_padded=keeps, saves_inputs=saves_in, saves_output=saves_out
    )


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 300), st.integers(0, 60), st.integers(0, 2**32), st.sampled_from([0.0, 0.5, 0.9]))
def test_structures_equal_renumbering_after_every_step(rows, count, seed, alike):
    rng = np.random.default_rng(seed)
    steps, index = [], []
    for _ in range(count):
        distinct = int(rng.integers(1, 12))
        flags = rng.integers(0, 2, (distinct, 4)).astype(bool)
        if rng.uniform() < alike:  # most of a network's steps are alike in every class
            flags[:] = flags[0]
        steps.append(_step(flags))
        index.append(rng.integers(0, distinct, rows))
    assert np.array_equal(structures(steps, index, rows), _old_structures(steps, index, rows))
    if count:  # steps with one entry per row (``index`` of slices)
        whole = [_step(rng.integers(0, 2, (rows, 4)).astype(bool)) for _ in range(count)]
        slices = [slice(None)] * count
        assert np.array_equal(structures(whole, slices, rows), _old_structures(whole, slices, rows))
