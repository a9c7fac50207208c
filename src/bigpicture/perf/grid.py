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

from bigpicture.engine.box import Box
from bigpicture.engine.diagonals import walk_together
from bigpicture.engine.regions import needs
from bigpicture.engine.split import Split
from bigpicture.engine.tiles import Diagonal, Layout, layout, write_box
from bigpicture.errors import TilingError
from bigpicture.perf.geometry import BlockGeometry, row_geometries, supported
from bigpicture.perf.strides import strides_of

__all__ = ["ClassGrid", "Layout", "TileClass", "class_grid", "class_grids", "layout", "tile_classes"]


MAX_PERIOD = 64  # interior tiles repeat with a period of at most the network's total stride
MAX_WALKS = 4096  # tiles walked one by one where the product rule does not count them (a few seconds)
MAX_CACHED = 64  # class grids and diagonals kept (one per pass of the layouts predicted last)


@dataclass(frozen=True)
class TileClass:
    count: int  # tiles of this class in the grid
    need: dict  # spatial node -> box, for one tile of the class
    writes: tuple[Box, ...]  # per sink


@dataclass(frozen=True)
class ClassGrid:
    """The classes of a grid, per dimension: ``per_dim[d]`` lists (tiles, diagonal row) for each
    kind of grid index along d; a class is one kind per dimension, its boxes those of the rows.
    ``separable`` is False where an empty box breaks the product rule: then ``listed`` holds
    every class as a ``TileClass``, found by visiting every tile."""

    split: Split
    lay: Layout
    diagonal: Diagonal
    per_dim: tuple[tuple[tuple[int, int], ...], ...]
    listed: tuple[TileClass, ...] | None = None
    geometry: Geometry | None = None
    lasts: tuple[tuple[int, ...], ...] = ()  # per dimension, the last grid index of each kind

    @property
    def separable(self) -> bool:
        return self.listed is None

    @property
    def classes(self) -> int:
        return len(self.listed) if self.listed is not None else math.prod(map(len, self.per_dim))

    @property
    def tiles(self) -> int:
        if self.listed is not None:
            return sum(c.count for c in self.listed)
        return math.prod(sum(n for n, _ in kinds) for kinds in self.per_dim)

    def materialise(self) -> list[TileClass]:
        """Every class with its boxes (one ``TileClass`` each): for tests and small grids."""
        if self.listed is not None:
            return list(self.listed)
        nd, rows, out = self.split.nd, self.diagonal.working_row, []
        for combo in itertools.product(*self.per_dim):

            def box(pick, combo=combo):
                return Box.from_dims(pick(rows(combo[d][1])).dim(d) for d in range(nd))

            writes = tuple(box(lambda r, i=i: r[0][i]) for i in range(len(self.split.sinks)))
            need = {n: box(lambda r, n=n: r[1][n]) for n in rows(0)[1]}
            out.append(TileClass(math.prod(c for c, _ in combo), need, writes))
        return out


class Geometry:
    """Per diagonal row, every node's step geometry in every dimension (``steps.geometries``), with
    the input copied or not: computed once, read by the class keys and by the per-node counts.
    Computed a block of rows at a time from the block's arrays (``geometry.BlockGeometry``), or
    row by row (``geometry.row_geometries``) where a row has an empty box."""

    def __init__(self, split: Split, diagonal: Diagonal) -> None:
        self.split, self.diagonal, self.working = split, diagonal, diagonal.working
        self.row = diagonal.working_row
        self._rows, self._blocks, self._supported = {}, {}, supported(split)

    def block(self, j: int) -> tuple[BlockGeometry | None, int]:
        """The geometry of row j's block and j's place in it; None where row j has an empty box."""
        block, r = self.diagonal.visit(j)
        if block.gaps[r] or not self._supported:
            return None, r
        if block.start not in self._blocks:
            self._blocks[block.start] = BlockGeometry(self.split, block)
        return self._blocks[block.start], r

    def __call__(self, j: int, copy: bool) -> dict:
        if (j, copy) not in self._rows:
            block, r = self.block(j)
            if block is None:
                other = self._rows.get((j, not copy))  # the same but where the image is read first
                self._rows[j, copy] = row_geometries(self.split, self.row(j)[1], copy, other)
            else:
                self._rows[j, copy] = block.row(r, copy)
        return self._rows[j, copy]


def tile_classes(split: Split, lay: Layout) -> list[TileClass]:
    """The distinct tiles of the grid and how often each occurs (tiles that write nothing skipped)."""
    return class_grid(split, lay).materialise()


def class_grids(splits: list[Split], lays: list[Layout]) -> list[ClassGrid]:
    """``class_grid`` of each pass, their diagonals not walked yet walked together first
    (``diagonals.walk_together``: one walk of the union of the passes' nodes, a few passes at once).
    Past ``MAX_CACHED`` passes the first diagonals would leave the cache before their grids read them:
    each is then walked alone."""
    fresh = [(s, lay) for s, lay in zip(splits, lays, strict=True) if (id(s), lay) not in _CLASSES]
    if len(fresh) <= MAX_CACHED:
        walk_together([diagonal_of(s, lay) for s, lay in fresh])
    return [class_grid(s, lay) for s, lay in zip(splits, lays, strict=True)]


def class_grid(split: Split, lay: Layout) -> ClassGrid:
    """The grid's classes, cached by split and layout (the planner predicts one layout per pass)."""
    key = (id(split), lay)
    if key in _CLASSES and _CLASSES[key][0] is split:
        return _CLASSES[key][1]
    classes = _class_grid(split, lay)
    if len(_CLASSES) >= MAX_CACHED:
        _CLASSES.pop(next(iter(_CLASSES)))
    _CLASSES[key] = (split, classes)  # the split is kept, so its id is not reused while cached
    return classes


_CLASSES: dict = {}


def diagonal_of(split: Split, lay: Layout) -> Diagonal:
    """The grid's diagonal rows (``tiles.Diagonal``), cached by split and layout: the planner's time
    bound (``bound.py``) reads a few of them, its prediction the rest."""
    key = (id(split), lay)
    if key not in _DIAGONALS or _DIAGONALS[key][0] is not split:
        if len(_DIAGONALS) >= MAX_CACHED:
            _DIAGONALS.pop(next(iter(_DIAGONALS)))
        _DIAGONALS[key] = (split, Diagonal(split, lay))  # the split is kept: its id is not reused
    return _DIAGONALS[key][1]


_DIAGONALS: dict = {}


def _class_grid(split: Split, lay: Layout) -> ClassGrid:
    diagonal = diagonal_of(split, lay)
    geometry = Geometry(split, diagonal)
    keys = [_dim_keys(split, lay, geometry, d) for d in range(split.nd)]
    if not diagonal.separable:  # an empty box breaks the product rule (a hull ignores it)
        return ClassGrid(split, lay, diagonal, (), tuple(_listed(split, lay, diagonal)))
    per_dim, lasts = [], []
    for d in range(split.nd):
        groups: dict = {}
        for j, key in enumerate(keys[d]):
            groups.setdefault(key, []).append(j)
        per_dim.append(tuple((len(js), js[0]) for js in groups.values()))
        lasts.append(tuple(js[-1] for js in groups.values()))
    return ClassGrid(split, lay, diagonal, tuple(per_dim), geometry=geometry, lasts=tuple(lasts))


def _listed(split: Split, lay: Layout, diagonal: Diagonal) -> list[TileClass]:
    """The classes of a grid the product rule does not count, each tile walked on its own; past
    ``MAX_WALKS`` tiles, one tile per combination of translates (``_translates``): the tiles of
    one combination are one another moved by whole periods away from every border."""
    if math.prod(lay.grid) <= MAX_WALKS:
        every = itertools.product(*map(range, lay.grid))
        return _group(split, ((1, *_tile(split, lay, index)) for index in every))
    kinds = [_translates(split, lay, diagonal.row, d) for d in range(split.nd)]
    combos = math.prod(map(len, kinds))
    if combos > MAX_WALKS:
        size = " x ".join(str(i[-1][1]) for i in lay.intervals)
        raise TilingError(
            f"tile {'x'.join(map(str, lay.tile))} on an input of {size} makes {combos:,} kinds of tiles,"
            " each predicted on its own: some tiles compute an empty box of"
            " a node (an output they do not write, a transposed convolution's output padding), so they"
            " cannot be counted per dimension. Give a larger tile=."
        )
    reps = ((math.prod(map(len, c)), tuple(js[0] for js in c)) for c in itertools.product(*kinds))
    return _group(split, ((count, *_tile(split, lay, index)) for count, index in reps))


def _translates(split: Split, lay: Layout, row, d: int) -> list[list[int]]:
    """The grid indices along d grouped by translation: in the interior (``_periodic``) those one
    period apart, each index near a border on its own."""
    g, found = lay.grid[d], _periodic(split, lay, row, d, lambda j: j, lay.grid[d], same=False)
    if found is None:
        return [[j] for j in range(g)]
    start, period, end = found
    inside = [list(range(r, end + 1, period)) for r in range(start, start + period)]
    return [[j] for j in range(start)] + inside + [[j] for j in range(end + 1, g)]


def _tile(split: Split, lay: Layout, index) -> tuple[tuple, dict]:
    writes = tuple(write_box(index, lay, split.strides[k], split.extents[k]) for k in split.sinks)
    return writes, needs(split, dict(zip(split.sinks, writes, strict=True)))


def _dim_keys(split: Split, lay: Layout, geometry: Geometry, d: int) -> list:
    """The cost key of every tile index with work along dimension d (``dim_keys`` with ``_key``)."""
    count = geometry.working[d]
    return dim_keys(split, lay, geometry.row, d, lambda j: _key(geometry, j, d), count)


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
    start = next((j for j in range(1, g) if _input_lo(split, row, j, d) > 0), None)
    if g <= 8:
        return None
    period = strides_of(split).period(lay.tile[d], d)
    if (
        period > MAX_PERIOD
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


def _shifted(split: Split, lay: Layout, row, d: int, j: int, period: int) -> bool:
    """Whether tile j + period is tile j moved by period tiles along dimension d, in every node: each
    box moved by the node pixels ``period`` tiles make (``strides.Strides.shifts``: a whole number)."""
    strides = strides_of(split)
    shift, whole = strides.shifts(period * lay.tile[d], d)
    diagonal = _blocks(row, j, j + period)
    if diagonal is not None:  # on the blocks' arrays, every box at once
        (b0, r0), (b1, r1) = diagonal.visit(j), diagonal.visit(j + period)
        group = strides.of_block(b0, split.sinks, d)
        if not whole[group].all():
            return False
        moved = shift[group]
        lo, hi = b1.lo[:, d, r1] - b0.lo[:, d, r0], b1.hi[:, d, r1] - b0.hi[:, d, r0]
        return bool((lo == moved).all() and (hi == moved).all())
    (w0, n0), (w1, n1) = row(j), row(j + period)
    group, shift, whole = strides.group[d], shift.tolist(), whole.tolist()
    pairs = itertools.chain(zip(split.sinks, w0, w1, strict=True), ((m, a, n1[m]) for m, a in n0.items()))
    for node, a, b in pairs:
        g = group[node]
        if not whole[g] or b.lo[d] - a.lo[d] != shift[g] or b.hi[d] - a.hi[d] != shift[g]:
            return False
    return True


def _key(geometry: Geometry, j: int, d: int) -> tuple:
    """What makes two tiles cost alike along dimension d: box lengths, and every step's geometry
    (``steps.geometries``: touching the border, reading a sub-box) with the input copied or not.
    Read from the arrays of row j's block (``BlockGeometry.key``), or ``_row_key`` where the row
    has an empty box."""
    block, r = geometry.block(j)
    return _row_key(geometry, j, d) if block is None else block.key(r, d)


def _row_key(geometry: Geometry, j: int, d: int) -> tuple:
    """``_key`` from row j's boxes and geometries, one node at a time."""
    writes, need = geometry.row(j)
    lengths = tuple(b.length(d) for b in (*writes, *need.values()))
    copied, direct = geometry(j, True), geometry(j, False)
    return lengths, tuple((copied[n][d][1:], direct[n][d][1:]) for n in copied)


def _group(split: Split, tiles) -> list[TileClass]:
    """Tiles of equal boxes up to a translation (shapes, and the image borders each touches) as one
    class each; tiles that write nothing are skipped, as the engine skips them."""
    classes: dict = {}
    extents = split.extents
    for count, writes, need in tiles:
        if all(w.empty for w in writes):
            continue
        key = tuple(
            (b.shape, tuple(a <= 0 for a in b.lo), tuple(h >= e for h, e in zip(b.hi, extents[n])))
            for n, b in (*zip(split.sinks, writes), *need.items())
        )
        if key in classes:
            c = classes[key]
            classes[key] = TileClass(c.count + count, c.need, c.writes)
        else:
            classes[key] = TileClass(count, need, writes)
    return list(classes.values())
