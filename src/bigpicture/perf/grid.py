"""The tile grid of a split, and its tiles grouped into classes that cost alike.

The box of a node in a tile is a product of per-dimension intervals that depend only on the
tile's index in that dimension, so the boxes of the tiles on the grid's diagonal give every
tile's boxes; tiles whose intervals have the same lengths (and touch the image border alike)
cost the same, so one walk per *class* (corner, edge, interior, ...) covers the grid:

    grid index in a dimension   0    1    2   ...  n-2   n-1
    class                      first |   interior ...  | last   -> 3 x 3 classes in 2D

and a 100,000^2 plan predicts as fast as a 4,096^2 one.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from fractions import Fraction

from bigpicture.engine.box import Box
from bigpicture.engine.plan import _per_dim_tile, _round_tile, _write_box
from bigpicture.engine.regions import needs
from bigpicture.engine.split import Split


@dataclass(frozen=True)
class Layout:
    """The tile grid of a split for one tile size: per spatial dimension, the tiles' intervals."""

    requested: tuple[int, ...]
    tile: tuple[int, ...]
    intervals: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(len(i) for i in self.intervals)


def layout(split: Split, input_shape, tile) -> Layout:
    """The grid ``plan_for_split`` makes for ``tile``, without making its tiles."""
    spatial = tuple(input_shape[2:])
    requested = _per_dim_tile(tile, len(spatial))
    used = tuple(
        _round_tile(t, n, [split.strides[k][d] for k in split.sinks])
        for d, (t, n) in enumerate(zip(requested, spatial, strict=True))
    )
    intervals = []
    for t, n in zip(used, spatial, strict=True):
        count = math.ceil(n / t)
        intervals.append(tuple((j * t, n if j == count - 1 else (j + 1) * t) for j in range(count)))
    return Layout(requested, used, tuple(intervals))


@dataclass(frozen=True)
class TileClass:
    count: int  # tiles of this class in the grid
    need: dict  # spatial node -> box, for one tile of the class
    writes: tuple[Box, ...]  # per sink


def tile_classes(split: Split, lay: Layout) -> list[TileClass]:
    """The distinct tiles of the grid and how often each occurs (tiles that write nothing skipped)."""
    key = (id(split), lay.tile, lay.intervals)
    if key in _CLASSES and _CLASSES[key][0] is split:
        return _CLASSES[key][1]
    classes = _tile_classes(split, lay)
    if len(_CLASSES) >= 64:
        _CLASSES.pop(next(iter(_CLASSES)))
    _CLASSES[key] = (split, classes)  # the split is kept, so its id is not reused while cached
    return classes


_CLASSES: dict = {}


def _tile_classes(split: Split, lay: Layout) -> list[TileClass]:
    grid, nd, rows = lay.grid, split.nd, {}

    def tile(index):
        writes = tuple(
            _write_box(index, lay.tile, lay.intervals, split.strides[k], split.extents[k])
            for k in split.sinks
        )
        return writes, needs(split, dict(zip(split.sinks, writes, strict=True)))

    def row(k: int):  # the k-th tile of the grid's diagonal
        if k not in rows:
            rows[k] = tile(tuple(min(k, g - 1) for g in grid))
        return rows[k]

    keys = [_dim_keys(split, lay, row, d) for d in range(nd)]
    if any(b.empty for writes, need in rows.values() for b in (*writes, *need.values())):
        # an empty box breaks the product rule (a hull ignores it): visit every tile
        return _group((1, *tile(index)) for index in itertools.product(*map(range, grid)))
    per_dim = []
    for d in range(nd):
        groups: dict = {}
        for j in range(grid[d]):
            groups.setdefault(keys[d][j], []).append(j)
        per_dim.append([(len(js), js[0]) for js in groups.values()])
    classes = []
    for combo in itertools.product(*per_dim):
        picked = [rows[j] for _, j in combo]

        def box(pick, picked=picked):
            return Box.from_dims(pick(picked[d]).dim(d) for d in range(nd))

        writes = tuple(box(lambda r, i=i: r[0][i]) for i in range(len(split.sinks)))
        need = {n: box(lambda r, n=n: r[1][n]) for n in rows[0][1]}
        classes.append(TileClass(math.prod(c for c, _ in combo), need, writes))
    return classes


def _dim_keys(split: Split, lay: Layout, row, d: int) -> list:
    """The cost key of every tile index along dimension d, visiting few tiles of a long grid.

    Away from the image border, tile j + p is tile j shifted by p tiles, where p makes the shift a
    whole number of pixels of every node: so the keys of interior tiles repeat with period p.
    """
    g, n = lay.grid[d], split.extents[split.input][d]
    period = math.lcm(*[(Fraction(lay.tile[d]) / split.strides[m][d]).denominator for m in split.strides])
    keys = {}
    start = next((j for j in range(1, g) if row(j)[1][split.input].lo[d] > 0), None)
    if (
        g <= 8
        or period > 8
        or start is None
        or start + period >= g - 1
        or not _shifted(split, lay, row, d, start, period)
    ):
        return [_key(split, *row(j), d) for j in range(g)]
    for j in range(start + period + 1):
        keys[j] = _key(split, *row(j), d)
    end = g - 1
    while end > start + period and (end == g - 1 or row(end)[1][split.input].hi[d] >= n):
        keys[end] = _key(split, *row(end), d)
        end -= 1
    for j in range(start + period + 1, end + 1):
        keys[j] = keys[start + (j - start) % period]
    return [keys[j] for j in range(g)]


def _shifted(split: Split, lay: Layout, row, d: int, j: int, period: int) -> bool:
    """Whether tile j + period is tile j moved by period tiles along dimension d, in every node."""
    (w0, n0), (w1, n1) = row(j), row(j + period)
    pairs = [(split.strides[k], a, b) for k, a, b in zip(split.sinks, w0, w1, strict=True)]
    pairs += [(split.strides[m], n0[m], n1[m]) for m in n0]
    for stride, a, b in pairs:
        shift = Fraction(period * lay.tile[d]) / stride[d]
        if shift.denominator != 1 or (b.lo[d] - a.lo[d], b.hi[d] - a.hi[d]) != (shift, shift):
            return False
    return True


def _key(split: Split, writes, need, d: int) -> tuple:
    """What makes two tiles cost alike along dimension d: box lengths, and touching the border."""
    lengths = tuple(b.shape[d] for b in (*writes, *need.values()))
    border = tuple(_pads(split.ops[n], b, d) for n, b in need.items() if n in split.ops)
    return lengths, border


def _pads(op, box: Box, d: int) -> bool:
    if not hasattr(op, "padded_box") or box.empty:
        return False
    padded = op.padded_box(box)
    return padded.lo[d] < 0 or padded.hi[d] > op.in_extents[0][d]


def _group(tiles) -> list[TileClass]:
    classes: dict = {}
    for count, writes, need in tiles:
        if all(w.empty for w in writes):
            continue
        key = (tuple(w.shape for w in writes), tuple(b.shape for b in need.values()))
        if key in classes:
            c = classes[key]
            classes[key] = TileClass(c.count + count, c.need, c.writes)
        else:
            classes[key] = TileClass(count, need, writes)
    return list(classes.values())
