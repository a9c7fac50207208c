"""Boxes of many tiles at once: per dimension, arrays of (start, stop) for a block of diagonal rows.

The planner walks the grid's diagonal (``tiles.Diagonal``) for dozens of rows of a network of a
thousand nodes; one ``Box`` at a time that is a few hundred thousand small Python objects. Here a
*block* is ``(lo, hi)``, two int64 arrays of shape (dimensions, rows), and each function is the
exact twin of a ``Box`` method or of an op's ``needs``, row by row:

    Box.hull, Box.clip          -> hull, clip
    Window.needs, Pad.needs     -> the padded box, then ``padding.source_box`` (source)
    Op.needs (pointwise)        -> clip to each input's extent
    any other rule              -> its own ``needs``, one row at a time (``_scalar_needs``)

``needs`` is ``regions.needs`` over a block: the same boxes, empty ones included, as walking each
row on its own (tests/test_batch_geometry.py compares them).
"""

from __future__ import annotations

import functools

import numpy as np

from bigpicture.engine.box import Box
from bigpicture.engine.padding import source_range
from bigpicture.engine.rules import Op, Window
from bigpicture.engine.rules.resample import Pad
from bigpicture.engine.split import Split


def empty(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per row, whether the box is empty (``Box.empty``: some dimension with hi <= lo)."""
    return (hi <= lo).any(axis=0)


def hull(alo, ahi, blo, bhi) -> tuple[np.ndarray, np.ndarray]:
    """``Box.hull`` per row: an empty box gives the other one, else the per-dimension hull."""
    a, b = empty(alo, ahi), empty(blo, bhi)
    lo = np.where(a, blo, np.where(b, alo, np.minimum(alo, blo)))
    hi = np.where(a, bhi, np.where(b, ahi, np.maximum(ahi, bhi)))
    return lo, hi


def clip(lo, hi, shape) -> tuple[np.ndarray, np.ndarray]:
    """``Box.clip`` per row: the box inside [0, shape). Per dimension that is the identity where the
    interval is inside already, so no row needs ``Box.clip``'s whole-box test. ``shape``: per-dimension
    sizes, or an array that broadcasts against ``lo`` (one shape per op: ``perf/geometry.py``)."""
    n = shape if isinstance(shape, np.ndarray) else _column(shape)
    lo = np.maximum(lo, 0)
    return lo, np.where(hi <= lo, lo, np.where(hi < n, hi, np.maximum(n, lo)))


def padded(op, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """``op.padded_box`` per row, for a ``Window`` or a ``Pad``."""
    if isinstance(op, Pad):
        shift = _column(op.pad_lo)
        return lo - shift, hi - shift
    s, p, d, k = (_column(v) for v in (op.step, op.pad_lo, op.dilation, op.kernel))
    return lo * s - p, (hi - 1) * s - p + d * (k - 1) + 1


def source(lo, hi, extent, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """``padding.source_box`` per row: the image interval the positions read under ``mode``."""
    n = _column(extent)
    a, b = np.maximum(lo, 0), np.minimum(hi, n)
    if mode == "constant":
        keep = a < b
        return np.where(keep, a, 0), np.where(keep, b, 0)
    inside = (lo >= 0) & (hi <= n) & (hi > lo)
    out_lo, out_hi = np.where(inside, lo, 0), np.where(inside, hi, 0)
    for d, r in zip(*np.nonzero(~inside & (hi > lo)), strict=True):  # reaching out: mapped one by one
        out_lo[d, r], out_hi[d, r] = source_range(int(lo[d, r]), int(hi[d, r]), int(extent[d]), mode)
    return out_lo, out_hi


def op_needs(op, lo, hi, rows, inside: dict | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``op.needs`` per row, for the rows where ``rows`` is True (the others are left empty, at 0;
    None: every row). ``inside``: the blocks known to lie inside an extent (``_clipped``), which
    the blocks made here join."""
    kind = type(op)
    if kind.needs is Op.needs:
        return [_clipped(lo, hi, e, inside) for e in op.in_extents]
    if (kind.needs is Window.needs and kind.padded_box is Window.padded_box) or (
        kind.needs is Pad.needs and kind.padded_box is Pad.padded_box
    ):
        if op.mode != "constant":
            return [source(*padded(op, lo, hi), op.in_extents[0], op.mode)]
        scale, low, high, extent, listed = _window(op)
        a, b = np.maximum(lo * scale + low, 0), np.minimum(hi * scale + high, extent)  # padded, clipped
        keep = a < b
        read = a * keep, b * keep  # ``source``'s constant mode: each row in [0, extent), or (0, 0)
        if inside is not None:
            inside[id(read[0])] = (*read, listed)
        return [read]
    return _scalar_needs(op, lo, hi, rows)


def _window(op) -> tuple:
    """A window's or a padding's ``padded`` as lo x scale + low, hi x scale + high (integers: the
    same numbers), with its input's extent as a column and a tuple, cached by op (the op is kept,
    so its id is not reused while cached): a deep network's walks ask each op's dozens of times."""
    found = _WINDOWS.get(id(op))
    if found is None or found[0] is not op:
        if isinstance(op, Pad):
            scale = (1,) * len(op.pad_lo)
            low = high = tuple(-int(p) for p in op.pad_lo)
        else:
            scale = tuple(int(v) for v in op.step)
            low = tuple(-int(p) for p in op.pad_lo)
            params = zip(scale, op.pad_lo, op.dilation, op.kernel, strict=True)
            high = tuple(-s - int(p) + int(d) * (int(k) - 1) + 1 for s, p, d, k in params)
        extent = tuple(map(int, op.in_extents[0]))
        if len(_WINDOWS) >= 16384:
            _WINDOWS.pop(next(iter(_WINDOWS)))
        columns = tuple(_column(v) for v in (scale, low, high, extent))
        found = _WINDOWS[id(op)] = (op, (*columns, extent))
    return found[1]


_WINDOWS: dict = {}


def _clipped(lo, hi, extent, inside: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """``clip(lo, hi, extent)``; ``lo`` and ``hi`` themselves where ``inside`` holds them with an extent
    no larger, as it holds what ``clip`` and a constant-padded window return: in every row and
    dimension 0 <= lo < hi <= extent, or 0 <= lo = hi, where ``clip`` changes nothing. A chain of
    pointwise ops then passes one block along, clipped once."""
    if inside is None:
        return clip(lo, hi, extent)
    known = inside.get(id(lo))
    if known is not None and known[1] is hi:
        if known[2] == extent or all(a <= b for a, b in zip(known[2], extent, strict=True)):
            return lo, hi
    out = clip(lo, hi, extent)
    inside[id(out[0])] = (*out, tuple(map(int, extent)))  # the arrays are kept: their ids stay theirs
    return out


def _scalar_needs(op, lo, hi, rows) -> list[tuple[np.ndarray, np.ndarray]]:
    """Any other rule's ``needs``, one row at a time (transposed convolutions, resampling, ...)."""
    out = [(np.zeros_like(lo), np.zeros_like(hi)) for _ in op.inputs]
    los, his = lo.T.tolist(), hi.T.tolist()
    for r in range(lo.shape[1]) if rows is None else np.flatnonzero(rows).tolist():
        for (olo, ohi), box in zip(out, op.needs(Box._of(tuple(los[r]), tuple(his[r]))), strict=True):
            olo[:, r], ohi[:, r] = box.lo, box.hi
    return out


def needs(split: Split, writes: dict, rows: int) -> dict:
    """``regions.needs`` for ``rows`` tiles at once: ``writes`` maps each sink to its (lo, hi) block."""
    zero = np.zeros((split.nd, rows), dtype=np.int64)
    order = [n for n in reversed(split.order) if split.roles[n] == "spatial"]
    need = _walk(order, writes, split.ops, zero, {})
    need.setdefault(split.input, (zero, zero))
    return need


def needs_many(splits: list[Split], writes: list[dict], rows: list[int]) -> dict | None:
    """``needs`` of several splits at once, their rows side by side (split k's in the columns of
    ``columns(rows)[k]``): every node of any of them walked once over every split's rows. The passes
    of a network are nested prefixes of one graph that share their ops, each with its own boxes: a
    squeeze-and-excitation network's 51 walks of up to 600 nodes become one of the union's 600.

    A node's columns in a split it is not spatial in are the empty box (0, 0), which its inputs
    skip as ``needs`` skips a user outside the split; the rest is ``needs``' fold, column by column.
    Returns node -> (lo, hi) over every column (a node in none of the splits: absent); None where
    the splits do not share their graph and their nodes' ops (then walk each with ``needs``)."""
    gm, nd, total = splits[0].gm, splits[0].nd, sum(rows)
    members: dict = {}  # node -> in which splits it is spatial
    ops: dict = {}
    for k, s in enumerate(splits):
        if s.gm is not gm or s.nd != nd:
            return None
        for node in s.order:
            if s.roles[node] != "spatial":
                continue
            op = s.ops.get(node)
            if node not in members:
                members[node], ops[node] = [False] * len(splits), op
            elif ops[node] is not op:
                return None
            members[node][k] = True
    zero = np.zeros((nd, total), dtype=np.int64)
    starts: dict = {}  # a sink's write blocks in the columns of its splits, (0, 0) in the others
    for w, at in zip(writes, columns(rows), strict=True):
        for node, (lo, hi) in w.items():
            if node not in starts:
                starts[node] = zero.copy(), zero.copy()
            starts[node][0][:, at], starts[node][1][:, at] = lo, hi
    patterns: dict = {}  # a node's splits -> the mask of their columns (None: every column)
    masks = {}
    for node, where in members.items():
        key = tuple(where)
        if key not in patterns:
            patterns[key] = None if all(key) else np.repeat(np.array(key), rows)
        masks[node] = patterns[key]
    order = [n for n in reversed(gm.graph.nodes) if n in members]
    if len(order) != len(members):
        return None
    return _walk(order, starts, ops, zero, masks)


def columns(rows: list[int]) -> list[slice]:
    """The columns of each split in ``needs_many``'s blocks."""
    ends = np.cumsum([0, *rows]).tolist()
    return [slice(a, b) for a, b in zip(ends, ends[1:])]


def _walk(order: list, writes: dict, ops: dict, zero: np.ndarray, masks: dict) -> dict:
    """``needs``' reverse walk over ``order`` (users before their inputs): each node's box the hull of
    its write box (``writes``) and of what its users in the walk need of it, per row, skipping the
    rows where a user's box is empty. ``masks``: node -> the columns where it is in the walk (None
    or absent: every column), the others made (0, 0)."""
    need: dict = {}
    gone: dict = {}  # node -> per row, whether its box is empty; None where no row's is
    asked: dict = {}  # user -> the blocks it needs of its inputs, once for all of them (a concat)
    inside: dict = {}  # id(lo) -> (lo, hi, extent): blocks inside an extent (``_clipped``)
    emptied: dict = {}  # id(lo) -> (lo, hi, gone): nodes of one block (a chain) tested once
    for node in order:
        fresh = node not in writes  # the box is still the empty one: a hull gives the other box
        lo, hi = writes.get(node, (zero, zero))
        for user in node.users:
            if user not in need:  # not spatial, or computed in another pass
                continue
            keep = None if gone[user] is None else ~gone[user]
            if keep is not None and not keep.any():
                continue
            if user not in asked:
                op = ops[user]
                asked[user] = op_needs(op, *need[user], keep, inside), op.inputs
            blocks, inputs = asked[user]
            other = blocks[inputs.index(node)]
            if fresh and keep is None:  # most nodes: their one user's box
                lo, hi, fresh = *other, False
                continue
            hlo, hhi = hull(lo, hi, *other)
            lo, hi = (hlo, hhi) if keep is None else (np.where(keep, hlo, lo), np.where(keep, hhi, hi))
            fresh = False
        mask = masks.get(node)
        if mask is not None:
            lo, hi = np.where(mask, lo, 0), np.where(mask, hi, 0)
        need[node] = lo, hi
        known = emptied.get(id(lo))
        if known is None or known[1] is not hi:
            below = hi <= lo
            known = emptied[id(lo)] = lo, hi, below.any(axis=0) if below.any() else None
        gone[node] = known[2]
    return need


def _column(values) -> np.ndarray:
    """Per-dimension values as a column, to broadcast over a block's rows."""
    return _columns(values if type(values) is tuple else tuple(values))


@functools.lru_cache(maxsize=1024)
def _columns(values: tuple) -> np.ndarray:
    column = np.asarray([int(v) for v in values], dtype=np.int64)[:, None]
    column.flags.writeable = False  # shared by every caller
    return column
