"""Every node's step geometry over a class grid's kinds, per dimension, for all nodes of a pass at once.

``classes._Grid.geometry_features`` gives, per node and dimension, which kinds of grid index share
a step geometry (``steps.geometries``: the lengths of the node's box and its inputs' boxes, whether
its window reaches out of the image, whether it reads a sub-box, a transposed convolution's input):

    kinds along d            j_0    j_1    j_2    j_3  ...
    node's geometry there    g_a    g_b    g_a    g_c         -> index (0, 1, 0, 2), firsts (j_0, j_1, j_3),
                                                               tiles per distinct one, the distinct ones

Made node by node from each kind's row of geometries (``grid.Geometry``: a dict of tuples per row),
that was a tuple per node, dimension and row, and a dict per node. Here each dimension is one table
(nodes, kinds, fields) gathered from the arrays of the rows' blocks (``geometry.BlockGeometry``),
and nodes whose table rows are equal (most: a deep network repeats a few geometries) share one
column, built once from Python numbers. The same values exactly (tests/test_kind_columns.py).
"""

from __future__ import annotations

import functools

import numpy as np

from bigpicture.perf.unique_rows import unique_rows


def node_columns(geometry, reps: list[list[int]], counts: list[list[int]], copy: bool) -> dict | None:
    """Per node of the grid's blocks: per dimension (index, firsts, tiles, values) as
    ``classes._Grid._column`` makes them from each kind's ``geometry(j, copy)[node][d]``; None where
    some kind's row has no block arrays (an empty box, a rule ``BlockGeometry`` does not know)."""
    picks = {j: geometry.block(j) for js in reps for j in js}
    blocks = list({id(b): b for b, _ in picks.values()}.values())
    if any(b is None for b in blocks):
        return None
    first = blocks[0]
    if any(b.ops != first.ops or b.block.nodes != first.block.nodes for b in blocks[1:]):
        return None  # not one node order (blocks of one split's walks share it)
    index = _box_index(first)
    out: dict = {node: [] for node in first.ops}
    last = None  # the previous dimension's (kinds, tiles, table)
    for d, (js, ns) in enumerate(zip(reps, counts, strict=True)):
        table = _table(picks, js, index, d, copy)
        if last is not None and last[0] == js and last[1] == ns and np.array_equal(last[2], table):
            for columns in out.values():  # a square grid: the same columns as along d - 1
                columns.append(columns[-1])
            continue
        last = js, ns, table
        values, codes = _values(table.reshape(-1, table.shape[2]), index.shape[1])
        codes = codes.reshape(table.shape[:2])  # (nodes, kinds): the number of each one's geometry
        kinds, tiles, leads, offsets = _groups(codes, ns)
        made: dict = {}  # a node's codes' bytes -> its column
        raw, width = codes.tobytes(), codes.shape[1] * codes.itemsize
        listed = codes.tolist()
        for i, node in enumerate(first.ops):
            key = raw[i * width : (i + 1) * width]
            column = made.get(key)
            if column is None:
                a, b = offsets[i], offsets[i + 1]
                at = leads[a:b]
                geometries = [values[listed[i][k]] for k in at]
                column = made[key] = (tuple(kinds[i]), [js[k] for k in at], tiles[a:b], geometries)
            out[node].append(column)
    return out


def _box_index(bg) -> np.ndarray:
    """Per node of ``bg``'s ops, the indices of its box and its inputs' boxes in the block's arrays
    (``BlockGeometry.row``'s order), padded with -1: (nodes, most boxes of a node)."""
    boxes = [(bg.where[n], *bg.inputs[n]) for n in bg.ops]
    out = np.full((len(boxes), max(map(len, boxes), default=1)), -1, dtype=np.int64)
    for i, b in enumerate(boxes):
        out[i, : len(b)] = b
    return out


def _table(picks: dict, js: list[int], index: np.ndarray, d: int, copy: bool) -> np.ndarray:
    """(nodes, kinds, fields) along d: per node and kind j, its boxes' lengths (-1 past its boxes),
    then ``outside``, ``differ[copy]`` and ``extra`` of row j."""
    m = index.shape[1]
    table = np.empty((index.shape[0], len(js), m + 3), dtype=np.int64)
    by_block: dict = {}  # block -> (its kinds' places in js, their rows in the block)
    for k, j in enumerate(js):
        bg, r = picks[j]
        entry = by_block.setdefault(id(bg), (bg, [], []))
        entry[1].append(k), entry[2].append(r)
    for bg, ks, rs in by_block.values():
        lo, hi = bg.block.lo[:, d, rs].astype(np.int64), bg.block.hi[:, d, rs]
        lengths = np.concatenate([np.maximum(hi - lo, 0), np.full((1, len(rs)), -1, dtype=np.int64)])
        table[:, ks, :m] = lengths[index].transpose(0, 2, 1)  # -1 indexes the padding row
        table[:, ks, m] = bg.outside[:, d, rs]
        table[:, ks, m + 1] = bg.differ[copy][:, d, rs]
        table[:, ks, m + 2] = bg.extra[:, d, rs]
    return table


def _values(flat: np.ndarray, m: int) -> tuple[list[tuple], np.ndarray]:
    """The distinct rows of ``flat`` (lengths padded with -1 to ``m``, outside, differ, extra) as
    ``BlockGeometry.row``'s geometries (lengths, outside, differ, extra: the flags as bools), and
    each row's number among them. Rows hashed to one integer each, checked against the rows."""
    _, first, inverse = np.unique(flat @ _weights(flat.shape[1]), return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if not (flat[first][inverse] == flat).all():  # two rows share a hash: the exact way
        first, inverse = unique_rows(flat)
    rows = flat[first]
    if not len(rows):  # no kinds (a network that returns its input: no node but the input's)
        return [], inverse
    boxes = m - (rows[:, :m] < 0).sum(axis=1)  # per row, its boxes (the rest padding)
    if (boxes == boxes[0]).all():  # one group: the rows in their order
        groups, order = [np.arange(len(rows))], None
    else:
        groups = [np.flatnonzero(boxes == b) for b in np.unique(boxes).tolist()]
        order = np.argsort(np.concatenate(groups), kind="stable").tolist()
    made = []
    for at in groups:
        picked = rows[at]
        made += zip(map(tuple, picked[:, : boxes[at[0]]].tolist()), picked[:, m].astype(bool).tolist(),
                    picked[:, m + 1].astype(bool).tolist(), picked[:, m + 2].tolist())  # fmt: skip
    return (made if order is None else [made[i] for i in order]), inverse


def _groups(codes: np.ndarray, ns: list[int]) -> tuple[list, list, list, list]:
    """Per node (a row of ``codes``: each kind's geometry): each kind's distinct geometry numbered in
    order of first kind, then flat over the nodes, the grid indices that have each (``ns``: per kind)
    and the first kind that has each, with each node's offset into those."""
    same = codes[:, :, None] == codes[:, None, :]  # (nodes, kinds, kinds)
    first = same.argmax(axis=2)  # per kind, the first kind equal to it
    leads = first == np.arange(codes.shape[1])
    kinds = np.take_along_axis(np.cumsum(leads, axis=1) - 1, first, axis=1)
    tiles = same @ np.asarray(ns, dtype=np.int64)  # per kind, the grid indices of its geometry
    offsets = np.concatenate([[0], np.cumsum(leads.sum(axis=1))]).tolist()
    return kinds.tolist(), tiles[leads].tolist(), np.nonzero(leads)[1].tolist(), offsets


@functools.cache
def _weights(columns: int) -> np.ndarray:
    """``_values``' hash weights for rows of ``columns`` fields (drawn once, read-only)."""
    weights = np.random.default_rng(1).integers(1, 2**62, size=columns, dtype=np.int64)
    weights.flags.writeable = False
    return weights
