"""``classes._combos`` (one node's rows on arrays), ``_small_combos`` (on Python numbers) and their
distinct rows (``_unique_rows``) as they were before every build of a prediction was made at once
(``combos.combos_many``, integ at 93d0848), verbatim: the reference of tests/test_combos_many.py."""

from __future__ import annotations

import itertools
import math
import operator

import numpy as np

from bigpicture.perf.steps import Rows


def _combos_of(per_dim: list, lengths: list, boxes: list, shaped: bool) -> tuple:
    """``_small_combos`` of a small grid (<= ``SMALL_TABLE`` combinations), ``_combos`` otherwise."""
    small = math.prod(len(f[1]) for f in per_dim) <= SMALL_TABLE
    return (_small_combos if small else _combos)(per_dim, lengths, boxes, shaped)


def _combos(per_dim: list, lengths: list, boxes: list, shaped: bool) -> tuple[Rows, np.ndarray, np.ndarray]:
    """(rows, tiles, the distinct row of each combination) of ``_node_rows``, on arrays over every
    combination of the per-dimension geometries (a 3D grid's tens of thousands). ``shaped``: the
    key holds the input's shape (a CPU convolution's). The table (per combination: the products of
    the lengths, outside, copied, then each dimension's last two lengths if ``shaped``) is filled in
    place by broadcasting over the grid of combinations: a few numpy calls per dimension."""
    nd, sizes = len(per_dim), [len(f[1]) for f in per_dim]
    x = [np.array(v, dtype=np.int64) for v in lengths]  # per dimension, (features, quantities)
    q = x[0].shape[1]
    table = np.empty((*sizes, q + 2 + (2 * nd if shaped else 0)), dtype=np.int64)

    def along(d: int, a: np.ndarray) -> np.ndarray:  # ``a`` (features, ...) broadcast along dimension d
        return a.reshape([-1 if e == d else 1 for e in range(nd)] + [a.shape[1]])

    numel, flags = along(0, x[0]), along(0, _flags(per_dim[0]))
    for d in range(1, nd):
        numel, flags = numel * along(d, x[d]), flags | along(d, _flags(per_dim[d]))
    table[..., :q], table[..., q : q + 2] = numel, flags
    if shaped:
        for d in range(nd):
            table[..., q + 2 + 2 * d : q + 4 + 2 * d] = along(d, x[d][:, -2:])
    table = table.reshape(-1, table.shape[-1])
    first, inverse = _unique_rows(table)
    weights = _outer([np.array(f[2], dtype=np.float64) for f in per_dim], np.multiply)  # exact: below 2^53
    tiles = np.bincount(inverse, weights=weights)
    distinct = table[first]
    last = np.empty((2, len(first), nd), dtype=np.int64)  # per distinct row and dimension: padded, extra
    for d, p in enumerate(np.unravel_index(first, sizes)):
        last[:, :, d] = x[d][p, -2:].T
    rows = Rows(
        distinct[:, 0],
        tuple((i, distinct[:, 1 + k]) for k, i in enumerate(boxes[1:])),
        last[0],
        last[1],
        distinct[:, q] != 0,
        distinct[:, q + 1] != 0,
    )
    return rows, np.rint(tiles).astype(np.int64), inverse


def _flags(feature: tuple) -> np.ndarray:
    """Per distinct geometry along a dimension (``_Grid.features``): (outside, copied), copied being
    outside or reading a sub-box (``steps.geometries``' flags), as bools."""
    return np.array([(v[1], v[1] or v[2]) for v in feature[3]], dtype=bool)


def _small_combos(
    per_dim: list, lengths: list, boxes: list, shaped: bool
) -> tuple[Rows, np.ndarray, np.ndarray]:
    """``_combos`` of a few dozen combinations on Python numbers: numpy's cost per call is most of
    it there (a squeeze-and-excitation network's 25,000 nodes and passes, 9 combinations each). The
    same numbers: products and sums of Python ints are exact, as the int64 ones and the float64 tile
    counts (integers below 2^53) are; rows as tuples sort as the int64 table's rows do."""
    seen: dict = {}  # distinct row -> [its first combination, the tiles that run it]
    order = []  # each combination's row
    per_feature = [
        [(k, tuple(x[k]), bool(f[3][k][1]), bool(f[3][k][1] or f[3][k][2]), f[2][k]) for k in range(len(x))]
        for f, x in zip(per_dim, lengths, strict=True)
    ]  # per dimension and feature: (its id, lengths, outside, copied, tiles)
    for combo in itertools.product(*per_feature):
        numel, out, copied, tiles = combo[0][1], combo[0][2], combo[0][3], combo[0][4]
        for _, x, o, c, t in combo[1:]:
            numel, out, copied, tiles = tuple(map(operator.mul, numel, x)), out or o, copied or c, tiles * t
        key = (*numel, out, copied)
        key += tuple(v for g in combo for v in g[1][-2:]) if shaped else ()
        entry = seen.get(key)
        if entry is None:
            seen[key] = [tuple(g[0] for g in combo), tiles]
        else:
            entry[1] += tiles
        order.append(key)
    distinct = sorted(seen)
    rank = {key: u for u, key in enumerate(distinct)}
    q = len(boxes) + 2  # the row's quantities (``_lengths``), then its flags
    firsts = [[x[f] for x, f in zip(lengths, seen[key][0], strict=True)] for key in distinct]
    rows = Rows(
        np.array([key[0] for key in distinct], dtype=np.int64),
        tuple((i, np.array([key[k] for key in distinct], dtype=np.int64)) for k, i in enumerate(boxes) if k),
        np.array([[x[-2] for x in picked] for picked in firsts], dtype=np.int64).reshape(len(distinct), -1),
        np.array([[x[-1] for x in picked] for picked in firsts], dtype=np.int64).reshape(len(distinct), -1),
        np.array([bool(key[q]) for key in distinct]),
        np.array([bool(key[q + 1]) for key in distinct]),
    )
    tiles = np.array([seen[key][1] for key in distinct], dtype=np.int64)
    return rows, tiles, np.array([rank[key] for key in order], dtype=np.int64)


def _unique_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(table, axis=0)``'s first index of each distinct row and each row's distinct one,
    in its (lexicographic) order, 2x faster on a few hundred rows: the rows sorted by ``np.lexsort``
    (stable: equal rows keep their order, the first one leads), each distinct one where a row
    differs from the one before. Small tables (a few dozen rows) as tuples in a dict."""
    if len(table) <= SMALL_TABLE:
        return _unique_small(table)
    order = np.lexsort(table.T[::-1])  # column 0 first, as np.unique sorts rows
    ordered = table[order]
    leads = np.empty(len(table), dtype=bool)
    leads[0] = True
    np.any(ordered[1:] != ordered[:-1], axis=1, out=leads[1:])
    inverse = np.empty(len(table), dtype=np.int64)
    inverse[order] = np.cumsum(leads) - 1
    return order[leads], inverse


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


def _outer(per_dim: list[np.ndarray], combine) -> np.ndarray:
    """Per combination of one entry per dimension (row-major), the entries combined: (combinations,
    ...) for per-dimension arrays of (entries, ...)."""
    out = per_dim[0]
    for values in per_dim[1:]:
        out = combine(out[:, None], values[None, :]).reshape((-1,) + values.shape[1:])
    return out
