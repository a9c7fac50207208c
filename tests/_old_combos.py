"""``classes._combos`` and ``classes._unique_rows`` as they were before they were made faster (at
ff38bd5), verbatim: the reference tests/test_combos_fast.py compares the fast ones with."""

from __future__ import annotations

import functools

import numpy as np

from bigpicture.perf.steps import Rows


def _combos(per_dim: list, lengths: list, boxes: list, shaped: bool) -> tuple[Rows, np.ndarray, np.ndarray]:
    """(rows, tiles, the distinct row of each combination) of ``_node_rows``, on arrays over every
    combination of the per-dimension geometries (a 3D grid's tens of thousands). ``shaped``: the
    key holds the input's shape (a CPU convolution's)."""
    lengths = [np.array(x, dtype=np.int64) for x in lengths]
    numels = _outer(lengths, np.multiply)  # (combinations, quantities)
    out = _outer([np.array([v[1] for v in f[3]]) for f in per_dim], np.logical_or)[:, None]
    copied = out | _outer([np.array([v[2] for v in f[3]]) for f in per_dim], np.logical_or)[:, None]
    columns = [numels, out, copied]
    picks = np.unravel_index(np.arange(len(numels)), [len(f[1]) for f in per_dim])
    if shaped:
        columns.append(np.concatenate([x[p][:, -2:] for x, p in zip(lengths, picks, strict=True)], 1))
    table = np.concatenate([c.astype(np.int64) for c in columns], 1)
    first, inverse = _unique_rows(table)
    tiles = np.bincount(
        inverse.reshape(-1), weights=_outer([np.array(f[2], dtype=np.float64) for f in per_dim], np.multiply)
    )
    dims = [x[p[first]] for x, p in zip(lengths, picks, strict=True)]  # per dimension, (steps, quantities)
    rows = Rows(
        numels[first, 0],
        tuple((i, numels[first, 1 + k]) for k, i in enumerate(boxes[1:])),
        np.stack([x[:, -2] for x in dims], 1),
        np.stack([x[:, -1] for x in dims], 1),
        out[first, 0],
        copied[first, 0],
    )
    return rows, np.rint(tiles).astype(np.int64), inverse.reshape(-1)


def _unique_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(table, axis=0)``'s first index of each distinct row and each row's distinct one,
    in its (lexicographic) order, 4x faster on a 3D grid's 32,768 combinations: each row hashed to
    one integer (a product with random weights, wrapping), checked against the rows themselves.
    Small tables (a few dozen combinations) as tuples in a dict, fewer numpy calls."""
    if len(table) <= SMALL_TABLE:
        return _unique_small(table)
    _, first, inverse = np.unique(table @ _weights(table.shape[1]), return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if not (table[first][inverse] == table).all():  # two rows share a hash: the exact way
        _, first, inverse = np.unique(table, axis=0, return_index=True, return_inverse=True)
        return first, inverse.reshape(-1)
    order = np.lexsort(table[first].T[::-1])  # column 0 first, as np.unique sorts rows
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[inverse]


SMALL_TABLE = 40  # rows up to which ``_unique_small`` is the faster (measured: 35 vs 59 us at 24 rows)


def _unique_small(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_unique_rows`` of a small table: its rows as tuples of Python ints, which sort as numpy's
    int64 rows do (lexicographically, column 0 first); each distinct row's first occurrence."""
    rows = list(map(tuple, table.tolist()))
    firsts: dict = {}
    for i, r in enumerate(rows):
        firsts.setdefault(r, i)
    distinct = sorted(firsts)
    rank = {r: k for k, r in enumerate(distinct)}
    first = np.array([firsts[r] for r in distinct], dtype=np.int64)
    return first, np.array([rank[r] for r in rows], dtype=np.int64)


@functools.cache
def _weights(columns: int) -> np.ndarray:
    """``_unique_rows``'s hash weights for a table of ``columns`` columns (drawn once, read-only)."""
    weights = np.random.default_rng(0).integers(1, 2**62, size=columns, dtype=np.int64)
    weights.flags.writeable = False
    return weights


def _outer(per_dim: list[np.ndarray], combine) -> np.ndarray:
    """Per combination of one entry per dimension (row-major), the entries combined: (combinations,
    ...) for per-dimension arrays of (entries, ...)."""
    out = per_dim[0]
    for values in per_dim[1:]:
        out = combine(out[:, None], values[None, :]).reshape((-1,) + values.shape[1:])
    return out
