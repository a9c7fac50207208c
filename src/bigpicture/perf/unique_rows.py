"""The distinct rows of an int64 table, as ``np.unique(table, axis=0, return_index=True,
return_inverse=True)`` numbers them, a few times faster.

``np.unique`` along an axis sorts the rows as records; ``np.lexsort`` sorts them once per column.
Here the columns are first packed into few int64 keys, each column shifted to start at zero and
put in mixed radix with its neighbours while their ranges multiply below 2^63 (a column of one
value dropped: it orders nothing); packing keeps the rows' lexicographic order and their equality.
The keys are then sorted stably (equal rows keep their order, the first one leads), and each
distinct row starts where a key differs from the one before.
"""

from __future__ import annotations

import numpy as np

LIMIT = 2**63  # int64's range: packed keys stay below it


def unique_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first index of each distinct row of ``table`` (rows, columns) in lexicographic order, the
    number of each row's distinct row): ``np.unique``'s ``index`` and ``inverse`` along axis 0."""
    rows = len(table)
    if not rows or not table.shape[1]:
        first = np.zeros(min(rows, 1), dtype=np.int64)
        return first, np.zeros(rows, dtype=np.int64)
    keys = _packed(table)
    order = np.argsort(keys[0], kind="stable") if len(keys) == 1 else np.lexsort(keys[::-1])
    leads = np.empty(rows, dtype=bool)
    leads[0] = True
    if len(keys) == 1:
        ordered = keys[0][order]
        np.not_equal(ordered[1:], ordered[:-1], out=leads[1:])
    else:
        ordered = np.stack(keys, axis=1)[order]
        np.any(ordered[1:] != ordered[:-1], axis=1, out=leads[1:])
    inverse = np.empty(rows, dtype=np.int64)
    inverse[order] = np.cumsum(leads) - 1
    return order[leads], inverse


def _packed(table: np.ndarray) -> list[np.ndarray]:
    """``table``'s columns packed into int64 keys (at least one) whose lexicographic order and
    equality are the rows'."""
    lows, highs = table.min(axis=0).tolist(), table.max(axis=0).tolist()
    keys, key, span = [], None, 1  # span: the values the key being packed takes
    for c, (lo, hi) in enumerate(zip(lows, highs, strict=True)):
        size = hi - lo + 1  # Python ints: no overflow
        if size == 1:
            continue
        if key is not None and span * size <= LIMIT:
            key, span = key * size + (table[:, c] - lo), span * size
            continue
        if key is not None:
            keys.append(key)
        if size <= LIMIT:
            key, span = table[:, c] - lo, size
        else:  # a column spanning more than int64 can shift: as it is
            key, span = table[:, c].copy(), LIMIT + 1
    keys.append(key if key is not None else np.zeros(len(table), dtype=np.int64))
    return keys
