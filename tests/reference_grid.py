"""The grid's period machinery and the diagonal's block walk as they were before they were made
faster (commit d74c489), verbatim but for names: the reference tests/test_grid_fast.py compares
the fast paths with. ``Fraction`` arithmetic per node, one block walked at a time, every
pointwise op's box clipped (``intervals_needs``)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from bigpicture.engine import intervals
from bigpicture.engine.rules import Op, Window
from bigpicture.engine.rules.resample import Pad
from bigpicture.engine.split import Split
from bigpicture.engine.tiles import Block, Diagonal, Layout, _narrow, write_intervals

MAX_PERIOD = 64


class OldDiagonal(Diagonal):
    """``Diagonal`` walking one block at a time, as before."""

    def block(self, k: int) -> Block:
        """The block of working rows holding row k, walked on first use. Blocks are laid from the
        first row in the first half of the rows with work, from the last one in the second half:
        the planner reads the rows near both borders of the grid, one block at each is enough."""
        n, size = max(self.working), self.BLOCK
        start = k - k % size if k < n // 2 else max(n - size - (n - 1 - k) // size * size, 0)
        if start not in self._blocks:
            self._blocks[start] = self._walk_block(start)
        return self._blocks[start]

    def _walk_block(self, start: int) -> Block:
        s, lay = self.split, self.lay
        ks = np.arange(start, start + self.BLOCK, dtype=np.int64)
        index = np.stack([np.minimum(ks, w - 1) for w in self.working])  # (dimensions, rows)
        writes = [write_intervals(index, lay, s.strides[n], s.extents[n]) for n in s.sinks]
        need = intervals_needs(s, dict(zip(s.sinks, writes, strict=True)), self.BLOCK)
        nodes = list(need)
        read = [need[n] for n in nodes if n is not self._unread]
        gaps = np.zeros(self.BLOCK, dtype=bool)
        for lo, hi in (*writes, *read):
            gaps |= intervals.empty(lo, hi)
        lo = _narrow(np.stack([b[0] for b in (*writes, *(need[n] for n in nodes))]))
        hi = _narrow(np.stack([b[1] for b in (*writes, *(need[n] for n in nodes))]))
        place = {n: len(writes) + i for i, n in enumerate(nodes)}
        return Block(start, len(writes), nodes, lo, hi, gaps, place)


def dim_keys(split: Split, lay: Layout, row, d: int, key, count: int | None = None) -> list:
    """``key(j)`` of every tile index j < ``count`` along dimension d (default: every index),
    visiting few tiles of a long grid (``row``: the diagonal's rows, ``tiles.Diagonal.row``).

    Away from the image border, tile j + p is tile j shifted by p tiles, where p makes the shift a
    whole number of pixels of every node: so the keys of interior tiles repeat with period p.
    """
    g = lay.grid[d] if count is None else count
    keys: dict = {}
    found = _periodic(split, lay, row, d, key, g, keys=keys)
    if found is None:
        return [key(j) for j in range(g)]
    start, period, end = found
    for j in range(start + period + 1, end + 1):
        keys[j] = keys[start + (j - start) % period]
    return [keys[j] for j in range(g)]


def _periodic(split: Split, lay: Layout, row, d: int, key, g: int, keys=None, same: bool = True):
    """(start, period, end): the indices of [start, end] along d, of the first g, are those of
    [start, start + period) moved by whole periods (``_shifted``, and with equal ``key`` where
    ``same``); ``keys`` gets the keys of the indices outside that range and of one period. None
    where the grid is short or has no such period."""
    keys = {} if keys is None else keys
    tile = Fraction(lay.tile[d])
    period = math.lcm(*[(tile / stride).denominator for stride in _distinct_strides(split, d)])
    start = next((j for j in range(1, g) if _input_lo(split, row, j, d) > 0), None)
    if (
        g <= 8
        or period > MAX_PERIOD
        or start is None
        or start + period >= g - 1
        or not _shifted(split, lay, row, d, start, period)
    ):
        return None
    for j in range(start + period + 1):
        keys[j] = key(j)
    end = g - 1  # near the far border, until a tile is its predecessor by one period, moved
    while end > start + period and not (
        _shifted(split, lay, row, d, end - period, period) and (not same or key(end) == key(end - period))
    ):
        keys[end] = key(end)
        end -= 1
    return start, period, end


def _blocks(row, *js: int) -> Diagonal | None:
    """The diagonal whose ``working_row`` is ``row`` (or whose ``row`` is, for rows where every
    dimension has work): its blocks' arrays hold rows ``js``, read without making their boxes."""
    diagonal = getattr(row, "__self__", None)
    if not isinstance(diagonal, Diagonal):
        return None
    working = row.__func__ is Diagonal.working_row
    return diagonal if working or (row.__func__ is Diagonal.row and max(js) < min(diagonal.working)) else None


def _input_lo(split: Split, row, j: int, d: int) -> int:
    """``row(j)[1][split.input].lo[d]``."""
    diagonal = _blocks(row, j)
    if diagonal is None:
        return row(j)[1][split.input].lo[d]
    block, r = diagonal.visit(j)
    return int(block.lo[block.place[split.input], d, r])


def _distinct_strides(split: Split, d: int) -> list:
    """The nodes' distinct strides along d, cached by split (nodes share few strides)."""
    key = (id(split), d)
    if key not in _STRIDES or _STRIDES[key][0] is not split:
        if len(_STRIDES) >= 256:
            _STRIDES.pop(next(iter(_STRIDES)))
        _STRIDES[key] = (split, list({stride[d] for stride in split.strides.values()}))
    return _STRIDES[key][1]


_STRIDES: dict = {}


def _shifted(split: Split, lay: Layout, row, d: int, j: int, period: int) -> bool:
    """Whether tile j + period is tile j moved by period tiles along dimension d, in every node."""
    shifts = _shifts(split, lay, d, period)
    diagonal = _blocks(row, j, j + period)
    if diagonal is not None:  # the same, on the blocks' arrays
        (b0, r0), (b1, r1) = diagonal.visit(j), diagonal.visit(j + period)
        moved = [shifts[k] for k in split.sinks] + [shifts[n] for n in b0.nodes]
        if None in moved:
            return False
        moved = np.array(moved, dtype=np.int64)
        lo, hi = b1.lo[:, d, r1] - b0.lo[:, d, r0], b1.hi[:, d, r1] - b0.hi[:, d, r0]
        return bool((lo == moved).all() and (hi == moved).all())
    (w0, n0), (w1, n1) = row(j), row(j + period)
    for k, a, b in zip(split.sinks, w0, w1, strict=True):
        shift = shifts[k]
        if shift is None or b.lo[d] - a.lo[d] != shift or b.hi[d] - a.hi[d] != shift:
            return False
    for m, a in n0.items():
        shift, b = shifts[m], n1[m]
        if shift is None or b.lo[d] - a.lo[d] != shift or b.hi[d] - a.hi[d] != shift:
            return False
    return True


def _shifts(split: Split, lay: Layout, d: int, period: int) -> dict:
    """Per node, how many of its pixels ``period`` tiles along d move it (None: not a whole number),
    cached by split, layout, dimension and period: the planner asks per pair of rows it compares."""
    key = (id(split), lay, d, period)
    if key not in _SHIFTS or _SHIFTS[key][0] is not split:
        moved, by_stride, shifts = Fraction(period * lay.tile[d]), {}, {}
        for node, stride in split.strides.items():  # nodes share few strides: one division each
            if stride[d] not in by_stride:
                shift = moved / stride[d]
                by_stride[stride[d]] = int(shift) if shift.denominator == 1 else None
            shifts[node] = by_stride[stride[d]]
        if len(_SHIFTS) >= 256:
            _SHIFTS.pop(next(iter(_SHIFTS)))
        _SHIFTS[key] = (split, shifts)  # the split is kept, so its id is not reused while cached
    return _SHIFTS[key][1]


_SHIFTS: dict = {}


def op_needs(op, lo, hi, rows) -> list[tuple[np.ndarray, np.ndarray]]:
    """``op.needs`` per row, for the rows where ``rows`` is True (the others are left empty, at 0;
    None: every row)."""
    kind = type(op)
    if kind.needs is Op.needs:
        return [intervals.clip(lo, hi, e) for e in op.in_extents]
    if (kind.needs is Window.needs and kind.padded_box is Window.padded_box) or (
        kind.needs is Pad.needs and kind.padded_box is Pad.padded_box
    ):
        return [intervals.source(*intervals.padded(op, lo, hi), op.in_extents[0], op.mode)]
    return intervals._scalar_needs(op, lo, hi, rows)


def intervals_needs(split: Split, writes: dict, rows: int) -> dict:
    """``regions.needs`` for ``rows`` tiles at once: ``writes`` maps each sink to its (lo, hi) block."""
    zero = np.zeros((split.nd, rows), dtype=np.int64)
    need: dict = {}
    gone: dict = {}  # node -> per row, whether its box is empty; None where no row's is
    asked: dict = {}  # user -> the blocks it needs of its inputs, once for all of them (a concat)
    for node in reversed(split.order):
        if split.roles[node] != "spatial":
            continue
        fresh = node not in writes  # the box is still the empty one: a hull gives the other box
        lo, hi = writes.get(node, (zero, zero))
        for user in node.users:
            if user not in need:  # not spatial, or computed in another pass
                continue
            keep = None if gone[user] is None else ~gone[user]
            if keep is not None and not keep.any():
                continue
            if user not in asked:
                op = split.ops[user]
                asked[user] = op_needs(op, *need[user], keep), op.inputs
            blocks, inputs = asked[user]
            other = blocks[inputs.index(node)]
            if fresh and keep is None:  # most nodes: their one user's box
                lo, hi, fresh = *other, False
                continue
            hlo, hhi = intervals.hull(lo, hi, *other)
            lo, hi = (hlo, hhi) if keep is None else (np.where(keep, hlo, lo), np.where(keep, hhi, hi))
            fresh = False
        need[node] = lo, hi
        rows_gone = intervals.empty(lo, hi)
        gone[node] = rows_gone if rows_gone.any() else None
    need.setdefault(split.input, (zero, zero))
    return need
