"""Many nodes' distinct steps over their combinations of per-dimension geometries, built at once.

``classes._combos`` built one node's rows (tests/_old_node_combos.py) with a few dozen numpy calls
over its table of combinations (products of lengths, flags, a convolution's input shape), most of its
time numpy's cost per call on tables of 9 to 300 rows: SEResNet152-2d at 16,384^2 builds 2,636 of them for one
prediction, 50 us each. Here every build asked for one prediction's passes (``node_rows.RowShare``)
is one table: its builds of one width stacked, each row led by its build's number,

    build  numel  inputs' numels  padded  extra  outside  copied  (last two lengths per dimension)
      0      ...                                                    combinations of build 0
      1      ...                                                    combinations of build 1, ...

sorted once (``unique_rows``: the build first, then within a build the order ``_combos`` sorts in,
the first combination of a row leading), its distinct rows cut back into each build's. The same
integers exactly, the tiles summed in float64 in the same order (``np.bincount`` adds a bin's
weights in input order) and rounded as ``_combos`` does (tests/test_combos_many.py).
"""

from __future__ import annotations

import math
from itertools import chain

import numpy as np

from bigpicture.perf.row_memo import Rows
from bigpicture.perf.unique_rows import unique_rows

CHUNK = 2**16  # combinations in one table: a few MB


def combos_many(builds: list[tuple]) -> list[tuple[Rows, np.ndarray, np.ndarray]]:
    """``[classes._combos(*b) for b in builds]`` as it was (tests/_old_node_combos.py): each build
    (per_dim, lengths, boxes, shaped)'s (rows, tiles, the distinct row of each combination)."""
    out: list = [None] * len(builds)
    groups: dict = {}  # builds whose tables have the same columns: dimensions, lengths, shaped
    for k, (per_dim, lengths, _, shaped) in enumerate(builds):
        groups.setdefault((len(per_dim), len(lengths[0][0]), bool(shaped)), []).append(k)
    for (nd, q, shaped), ks in groups.items():
        chunk, rows = [], 0
        for k in [*ks, None]:  # chunks of builds up to ``CHUNK`` combinations (a 3D grid's: thousands)
            combos = 0 if k is None else math.prod(len(f[1]) for f in builds[k][0])
            if chunk and (k is None or rows + combos > CHUNK):
                for at, result in zip(chunk, _group([builds[j] for j in chunk], nd, q, shaped), strict=True):
                    out[at] = result
                chunk, rows = [], 0
            if k is not None:
                chunk.append(k)
                rows += combos
    return out


def _group(builds: list[tuple], nd: int, q: int, shaped: bool) -> list[tuple]:
    """``combos_many`` of builds with ``nd`` dimensions, ``q`` lengths per geometry, ``shaped`` alike."""
    count = len(builds)
    sizes = np.array([len(f[1]) for b in builds for f in b[0]], dtype=np.int64).reshape(count, nd)
    x, flags, weights, at = [], [], [], []  # per dimension, every build's geometries end to end
    for d in range(nd):
        columns = [b[0][d] for b in builds]
        values = [v for f in columns for v in f[3]]
        flat = list(chain.from_iterable(chain.from_iterable(b[1][d] for b in builds)))
        x.append(np.array(flat, dtype=np.int64).reshape(-1, q))
        outside = np.array([v[1] for v in values], dtype=bool)
        flags.append(np.stack([outside, outside | np.array([v[2] for v in values], dtype=bool)], axis=1))
        weights.append(np.array(list(chain.from_iterable(f[2] for f in columns)), dtype=np.float64))
        at.append(np.cumsum(sizes[:, d]) - sizes[:, d])  # each build's first geometry
    combos = sizes.prod(axis=1)
    starts = np.cumsum(combos) - combos
    build = np.repeat(np.arange(count), combos)  # per combination, its build
    rest = np.arange(len(build)) - starts[build]  # its number in its build, unravelled row-major
    picks = [None] * nd  # per dimension, each combination's geometry (among every build's)
    for d in reversed(range(nd)):
        n = sizes[build, d]
        picks[d] = at[d][build] + rest % n
        rest //= n
    table = np.empty((len(build), 1 + q + 2 + (2 * nd if shaped else 0)), dtype=np.int64)
    table[:, 0] = build
    numel, flag, tiles = x[0][picks[0]], flags[0][picks[0]], weights[0][picks[0]]
    for d in range(1, nd):
        numel, flag = numel * x[d][picks[d]], flag | flags[d][picks[d]]
        tiles = tiles * weights[d][picks[d]]  # in ``classes._outer``'s order: exact below 2^53 anyway
    table[:, 1 : 1 + q], table[:, 1 + q : 3 + q] = numel, flag
    if shaped:
        for d in range(nd):
            table[:, 3 + q + 2 * d : 5 + q + 2 * d] = x[d][picks[d], -2:]
    first, inverse = unique_rows(table)  # the build first, then ``_combos``' table's columns
    summed = np.rint(np.bincount(inverse, weights=tiles)).astype(np.int64)
    found = np.bincount(build[first], minlength=count)  # distinct rows per build
    lo = np.cumsum(found) - found
    inverse -= lo[build]  # numbered within its build
    rows = table[first]
    last = np.stack([x[d][picks[d][first], -2:] for d in range(nd)], axis=2)  # (rows, 2, nd)
    padded, extra = np.ascontiguousarray(last[:, 0]), np.ascontiguousarray(last[:, 1])
    numel, inputs = rows[:, 1], [rows[:, 2 + k] for k in range(q - 3)]
    outside, copied = rows[:, 1 + q] != 0, rows[:, 2 + q] != 0
    out = []
    for b, (a, n, s, c) in enumerate(zip(lo.tolist(), found.tolist(), starts.tolist(), combos.tolist())):
        cut = slice(a, a + n)
        names = zip(builds[b][2][1:], inputs, strict=True)
        made = Rows(numel[cut], tuple((i, v[cut]) for i, v in names), padded[cut], extra[cut], outside[cut],
                    copied[cut])  # fmt: skip
        out.append((made, summed[cut], inverse[s : s + c]))
    return out
