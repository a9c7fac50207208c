"""The tile grid of a split, and its tiles made on demand (a 2048^3 volume at tile 8 has 16.7 million).

    dimension d   |--0--|--1--|--2--| ... |-g-1-|    the tile's intervals; the last one takes the rest
    tile (j0, j1) = interval j0 of dimension 0  x  interval j1 of dimension 1

Every rule maps boxes dimension by dimension, so a node's box in dimension d, for tile
(j0, j1, ...), is that of the grid's *diagonal* tile (j_d, j_d, ...): one reverse walk per
diagonal tile (``Diagonal``) gives the boxes of every tile. An empty box on the diagonal breaks
that (a hull ignores an empty box): then each tile is walked on its own.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np

from bigpicture.engine import intervals
from bigpicture.engine.box import Box
from bigpicture.engine.regions import needs
from bigpicture.engine.split import Split
from bigpicture.errors import TilingError


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
    """The grid for ``tile`` input pixels, rounded to a multiple of every sink's total stride."""
    spatial = tuple(input_shape[2:])
    requested = per_dim_tile(tile, len(spatial))
    used = tuple(
        _round_tile(t, n, [split.strides[k][d] for k in split.sinks])
        for d, (t, n) in enumerate(zip(requested, spatial, strict=True))
    )
    intervals = []
    for t, n in zip(used, spatial, strict=True):
        count = math.ceil(n / t)
        intervals.append(tuple((j * t, n if j == count - 1 else (j + 1) * t) for j in range(count)))
    return Layout(requested, used, tuple(intervals))


def per_dim_tile(tile, nd: int) -> tuple[int, ...]:
    tile = (
        (tile,) * nd if isinstance(tile, int) else tuple(tile) if isinstance(tile, (tuple, list)) else (tile,)
    )
    if len(tile) != nd or not all(isinstance(t, int) and t > 0 for t in tile):
        raise TilingError(
            f"tile={tile} does not fit a {nd}D input: give one positive int, or {nd} of them "
            f"(one per spatial dimension), e.g. tile={(256,) * nd}."
        )
    return tile


def _round_tile(t: int, n: int, strides: list[Fraction]) -> int:
    unit = math.lcm(*[f.numerator for f in strides])
    t = min(t, math.ceil(n / unit) * unit)
    return max(unit, round(t / unit) * unit)


def write_box(index, lay: Layout, stride, extent) -> Box:
    """The box of a sink (of ``stride`` and ``extent``) that the tile at grid ``index`` computes."""
    dims = []
    for d, j in enumerate(index):
        w = int(Fraction(lay.tile[d]) / stride[d])
        lo = min(j * w, extent[d])
        hi = extent[d] if j == lay.grid[d] - 1 else min((j + 1) * w, extent[d])
        dims.append((lo, hi))
    return Box.from_dims(dims)


class Diagonal:
    """The grid's diagonal tiles, walked on first use: ``row(k)`` is (write boxes, node boxes) of
    the tile (k, k, ...), each index capped at its dimension's last tile with work (``working``).

    Tiles past a dimension's last one with work write nothing (a network of valid convolutions
    writes less than its input, HoVerNet): the engine skips them, so a row reads only the
    dimensions where k has work, and is empty in the others (a row past every dimension's work is
    that empty tile's own walk). ``gaps``: the rows asked so far whose tile has an empty box, which
    break the product rule (a hull ignores an empty box).

    Rows are walked ``BLOCK`` at a time (``block``, with ``engine.intervals``): one walk of arrays
    costs about what one row of ``Box`` objects does; ``ask`` makes one row's boxes from its block."""

    BLOCK = 16

    def __init__(self, split: Split, lay: Layout) -> None:
        self.split, self.lay, self.rows, self.gaps, self._working_rows = split, lay, {}, set(), {}
        counts = [working_counts(split, lay, k) for k in split.sinks] or [lay.grid]
        self.working = tuple(map(max, zip(*counts, strict=True)))
        self.cover = self.working in counts  # the tiles with work are a product of ranges
        self._unread = split.input if split.input not in split.order else None
        self._blocks: dict = {}

    def row(self, k: int) -> tuple[tuple[Box, ...], dict]:
        if k not in self.rows:
            past = [d for d, w in enumerate(self.working) if k >= w]
            if len(past) == len(self.working):  # no dimension has work here: the empty tile itself
                self.rows[k] = self._walk(tuple(min(k, g - 1) for g in self.lay.grid))
            else:
                writes, need = self.working_row(k)
                self.rows[k] = (writes, need) if not past else _emptied(writes, need, past)
        return self.rows[k]

    def working_row(self, k: int) -> tuple[tuple[Box, ...], dict]:
        """(write boxes, node boxes) of the tile with work nearest (k, k, ...): each index capped
        at its dimension's last tile with work. Along a dimension d with k < ``working[d]``, its
        boxes are those of every tile of index k along d (``row`` makes the others empty)."""
        if k not in self._working_rows:
            self._working_rows[k] = self.ask(k)
        return self._working_rows[k]

    def ask(self, k: int) -> tuple[tuple[Box, ...], dict]:
        """Row k of the working rows, made from its block (``visit``)."""
        block, r = self.visit(k)
        made: dict = {}  # one Box per distinct box, as the scalar walk shares them along chains
        boxes = [made[ab] if ab in made else made.setdefault(ab, Box._of(*ab)) for ab in block.listed(r)]
        writes = tuple(boxes[: block.sinks])
        return writes, dict(zip(block.nodes, boxes[block.sinks :], strict=True))

    def visit(self, k: int) -> tuple[Block, int]:
        """The block of working row k and the row's place in it, the row counted as walked: its
        empty boxes, if any, join ``gaps`` (what reads the block's arrays reads the row)."""
        block = self.block(k)
        r = k - block.start
        if block.gaps[r]:
            self.gaps.add(k)
        return block, r

    def block(self, k: int) -> Block:
        """The block of working rows holding row k, walked on first use. Blocks are laid from the
        first row in the first half of the rows with work, from the last one in the second half:
        the planner reads the rows near both borders of the grid, one block at each is enough, and
        the two are walked together (a walk costs per op, hardly per row)."""
        n, size = max(self.working), self.BLOCK
        start = k - k % size if k < n // 2 else max(n - size - (n - 1 - k) // size * size, 0)
        if start not in self._blocks:
            starts = self.starts(start)
            self._blocks.update(zip(starts, self._walk_blocks(starts), strict=True))
        return self._blocks[start]

    def starts(self, start: int) -> list[int]:
        """The blocks walked with the one from ``start``: a border block brings the other border's."""
        borders = (0, max(max(self.working) - self.BLOCK, 0))
        return [start, *(b for b in borders if start in borders and b not in (start, *self._blocks))]

    def rows_of(self, starts: list[int]) -> tuple[int, list]:
        """(the rows of the blocks from ``starts``, the sinks' write blocks on them)."""
        s, lay, size = self.split, self.lay, self.BLOCK
        ks = np.concatenate([np.arange(start, start + size, dtype=np.int64) for start in starts])
        index = np.stack([np.minimum(ks, w - 1) for w in self.working])  # (dimensions, rows)
        return len(ks), [write_intervals(index, lay, s.strides[n], s.extents[n]) for n in s.sinks]

    def _walk_blocks(self, starts: list[int]) -> list[Block]:
        """The blocks from ``starts``, walked at once: each row's boxes depend on that row alone."""
        s = self.split
        rows, writes = self.rows_of(starts)
        need = intervals.needs(s, dict(zip(s.sinks, writes, strict=True)), rows)
        nodes = list(need)
        lo = np.stack([b[0] for b in (*writes, *(need[n] for n in nodes))])
        hi = np.stack([b[1] for b in (*writes, *(need[n] for n in nodes))])
        return self.blocks_of(starts, len(writes), nodes, lo, hi)

    def blocks_of(self, starts: list[int], sinks: int, nodes: list, lo, hi) -> list[Block]:
        """The blocks from ``starts`` of ``lo``, ``hi`` (the sinks' write boxes, then ``nodes``', on the
        blocks' rows one after the other); ``gaps``: some box empty, but the unread input's."""
        read = np.array([True] * sinks + [n is not self._unread for n in nodes])
        gaps = (hi[read] <= lo[read]).any(axis=(0, 1))
        place = {n: sinks + i for i, n in enumerate(nodes)}
        cut = [slice(i * self.BLOCK, (i + 1) * self.BLOCK) for i in range(len(starts))]
        return [
            Block(start, sinks, nodes, _narrow(lo[:, :, c]), _narrow(hi[:, :, c]), gaps[c], place)
            for start, c in zip(starts, cut, strict=True)
        ]

    def _walk(self, index: tuple[int, ...]) -> tuple[tuple[Box, ...], dict]:
        """One tile's boxes, walked on its own with ``Box`` objects (the reference for ``block``)."""
        s = self.split
        writes = tuple(write_box(index, self.lay, s.strides[n], s.extents[n]) for n in s.sinks)
        return writes, needs(s, dict(zip(s.sinks, writes, strict=True)))

    def walk_all(self) -> Diagonal:
        """Every row walked (once): ``separable`` then speaks for the whole grid."""
        if len(self.rows) < max(self.lay.grid):  # rows are memoised: walking again costs a lookup each
            for k in range(max(self.lay.grid)):
                self.row(k)
        return self

    @property
    def separable(self) -> bool:
        """Whether the product rule holds on the rows walked so far, for the tiles with work: no
        empty box in them (the input's box is empty in every tile of a pass that reads only held
        tensors, which breaks nothing), and those tiles a product of ranges (one sink, or one whose
        boxes cover every other's)."""
        return self.cover and not self.gaps


@dataclass(frozen=True, eq=False)
class Block:
    """``Diagonal.BLOCK`` working rows from ``start``: ``lo``, ``hi`` of shape (boxes, dimensions,
    rows), the boxes being the sinks' write boxes (the first ``sinks``) then ``nodes``' boxes;
    ``gaps``: per row, whether some box (but the unread input's) is empty."""

    start: int
    sinks: int
    nodes: list
    lo: np.ndarray
    hi: np.ndarray
    gaps: np.ndarray
    place: dict  # node -> its box's index in lo and hi
    cache: dict = field(default_factory=dict, repr=False)  # what readers derive from the block, kept with it

    def listed(self, r: int):
        """Row r as (lo, hi) tuples per box."""
        nd = self.lo.shape[1]
        lo = zip(*[self.lo[:, d, r].tolist() for d in range(nd)], strict=True)
        return zip(lo, zip(*[self.hi[:, d, r].tolist() for d in range(nd)], strict=True), strict=True)


def _narrow(a: np.ndarray) -> np.ndarray:
    """``a`` as int32 where its values fit (they do but for absurd images): half the memory of the
    blocks the planner's caches keep. What reads them computes in int64 (numpy widens)."""
    small = a.size == 0 or (a.min() >= np.iinfo(np.int32).min and a.max() <= np.iinfo(np.int32).max)
    return a.astype(np.int32) if small else a


def write_intervals(index: np.ndarray, lay: Layout, stride, extent) -> tuple[np.ndarray, np.ndarray]:
    """``write_box`` for many tiles: ``index`` of shape (dimensions, tiles) -> (lo, hi) arrays."""
    lo, hi = np.empty_like(index), np.empty_like(index)
    for d, j in enumerate(index):
        w = int(Fraction(lay.tile[d]) / stride[d])
        lo[d] = np.minimum(j * w, extent[d])
        hi[d] = np.where(j == lay.grid[d] - 1, extent[d], np.minimum((j + 1) * w, extent[d]))
    return lo, hi


def _emptied(writes: tuple[Box, ...], need: dict, dims: list[int]) -> tuple[tuple[Box, ...], dict]:
    """The boxes with the intervals along ``dims`` made empty (at their start)."""

    def cut(b: Box) -> Box:
        return Box._of(b.lo, tuple(b.lo[d] if d in dims else h for d, h in enumerate(b.hi)))

    return tuple(map(cut, writes)), {n: cut(b) for n, b in need.items()}


@dataclass(frozen=True)
class Tile:
    index: tuple[int, ...]
    box: Box  # input pixels this tile owns
    read: Box  # input pixels it reads: box plus halo, within the image
    writes: tuple[Box, ...]  # per sink of the plan, the region this tile computes


@dataclass(frozen=True, eq=False)
class Tiles(Sequence):
    """The tiles with work (some write box not empty), in row-major grid order, made when asked.

    ``working``: per dimension, how many leading grid indices have work, when the tiles with work
    are a product of those ranges (one sink, or one whose boxes cover every other's); else None
    and ``listed`` holds their indices."""

    split: Split
    lay: Layout
    diagonal: Diagonal = field(repr=False)
    working: tuple[int, ...] | None
    listed: tuple[tuple[int, ...], ...] | None = None
    positions: range | None = None
    made: dict = field(default_factory=dict, repr=False)  # index -> Tile: one object per tile, as a tuple

    @classmethod
    def of(cls, split: Split, lay: Layout) -> Tiles:
        """The tiles of ``split`` on ``lay``; the diagonal's rows are walked on first use (``walked``):
        the planner makes plans it never runs, and a deep network's rows take a second at 32,768^2."""
        diagonal = Diagonal(split, lay)
        counts = [working_counts(split, lay, k) for k in split.sinks]
        cover = next((c for c in counts if all(all(a >= b for a, b in zip(c, o)) for o in counts)), None)
        if cover is not None:
            return cls(split, lay, diagonal, tuple(cover), None, range(math.prod(cover)))
        grid = itertools.product(*map(range, lay.grid))
        listed = tuple(i for i in grid if any(all(map(int.__lt__, i, c)) for c in counts))
        return cls(split, lay, diagonal, None, listed, range(len(listed)))

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return replace(self, positions=self.positions[i])
        return self.tile(self.index(self.positions[i]))

    def __iter__(self):
        for p in self.positions:
            yield self.tile(self.index(p))

    def __eq__(self, other) -> bool:
        return isinstance(other, Tiles) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self):
        return (id(self.split), self.lay, self.working, self.listed, self.positions)

    def index(self, p: int) -> tuple[int, ...]:
        """The grid index of the p-th tile with work."""
        if self.listed is not None:
            return self.listed[p]
        out = []
        for n in reversed(self.working):
            p, j = divmod(p, n)
            out.append(j)
        return tuple(reversed(out))

    def tile(self, index: tuple[int, ...]) -> Tile:
        """The tile at grid ``index``, the same object every time it is asked for (the interpreter
        matches tiles by identity); a plan never run makes none."""
        if index not in self.made:
            self.made[index] = self._make(index)
        return self.made[index]

    def _make(self, index: tuple[int, ...]) -> Tile:
        s, lay = self.split, self.lay
        box = Box.from_dims(lay.intervals[d][j] for d, j in enumerate(index))
        writes = tuple(write_box(index, lay, s.strides[k], s.extents[k]) for k in s.sinks)
        if self.walked.separable:
            read = Box.from_dims(self.diagonal.row(j)[1][s.input].dim(d) for d, j in enumerate(index))
        else:
            read = needs(s, dict(zip(s.sinks, writes, strict=True)))[s.input]
        return Tile(index, box, read, writes)

    @property
    def walked(self) -> Diagonal:
        """The diagonal with every row walked, so that its ``separable`` holds for every tile."""
        return self.diagonal.walk_all()

    @property
    def separable(self) -> bool:
        return self.walked.separable and self.listed is None

    def per_dim(self, d: int) -> list[tuple[tuple[int, int], tuple[int, int], list[tuple[int, int]]]]:
        """Along dimension d, for each grid index with work: (box, read, writes per sink) intervals."""
        s, lay, rows = self.split, self.lay, self.diagonal
        out = []
        for j in range(self.working[d]):
            writes, need = rows.row(j)
            out.append((lay.intervals[d][j], need[s.input].dim(d), [w.dim(d) for w in writes]))
        return out


def working_counts(split: Split, lay: Layout, sink) -> tuple[int, ...]:
    """Per dimension, how many leading grid indices give ``sink`` a non-empty write box."""
    counts = []
    for d in range(split.nd):
        w = int(Fraction(lay.tile[d]) / split.strides[sink][d])
        counts.append(min(lay.grid[d], math.ceil(split.extents[sink][d] / w)))
    return tuple(counts)


def translation_period(split: Split) -> tuple[int, ...]:
    """Per dimension, the least input shift that moves every spatial node by whole pixels: shifting
    the input by D pixels shifts a node of stride s by D/s, an integer when the lcm of the strides'
    numerators divides D."""
    strides = [s for n, s in split.strides.items() if split.roles.get(n) == "spatial"]
    return tuple(math.lcm(*(s[d].numerator for s in strides)) for d in range(split.nd))


def geometry(split: Split, tile: Tile, need: dict, period, free) -> tuple | None:
    """A key that two tiles share when their boxes on every node are the same up to a translation.

    ``need``: the tile's box of every node (``Plan.needs``); ``period``: ``translation_period``;
    ``free``: per dimension, whether the tile may be compared with its translates there (else its
    absolute position counts, e.g. where it touches the image border and padding differs). Each
    box is taken relative to the tile's shift, a whole number of periods, on that node's own grid.
    None when some node has no stride (its grid is not the input's).
    """
    shifts = [lo // p if f else 0 for lo, p, f in zip(tile.box.lo, period, free, strict=True)]
    rest = tuple(lo - m * p for lo, m, p in zip(tile.box.lo, shifts, period, strict=True))
    relative = []
    for node, box in list(need.items()) + list(zip(split.sinks, tile.writes, strict=True)):
        stride = split.strides.get(node)
        if stride is None:
            return None
        steps = zip(shifts, period, stride, strict=True)
        shift = [-(m * p * f.denominator // f.numerator) for m, p, f in steps]
        relative.append(box.shift(shift))
    return (rest, tuple(relative))
