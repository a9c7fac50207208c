"""Every class of tiles at once: a grid's summed time and its largest peak, counted per dimension.

A class is one kind of grid index per dimension (``grid.ClassGrid``), so a 3D grid with 20 kinds
per dimension has 8,000 classes. Walking each would take minutes; instead:

- Time and work add up over tiles, node by node. A node's step is a function of its geometry in
  each dimension (``steps.dim_geometry``), so its total over the grid is

      sum over geometries (g_0, g_1, ...) of  tiles(g_0) x tiles(g_1) x ...  x  step(g_0, g_1, ...)

  with few geometries per node and dimension: one step per combination, not one per class.
- Peak memory is the largest of each class's walk, which is no sum. Classes whose steps have the
  same *structure* (which values alias, which padded copies autograd keeps) run the same walk with
  other byte counts, so ``walk.peaks`` walks them together on numpy arrays, one entry per class.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose
from bigpicture.engine.rules.window import Conv
from bigpicture.engine.split import Split
from bigpicture.perf.class_sums import summed
from bigpicture.perf.combos import combos_many
from bigpicture.perf.grid import ClassGrid
from bigpicture.perf.kind_columns import node_columns
from bigpicture.perf.node_rows import RowShare
from bigpicture.perf.rates import Rates
from bigpicture.perf.step_batch import steps_many
from bigpicture.perf.steps import padded_bounds, steps_of
from bigpicture.perf.walk import (
    TileWalk,
    grad_in,
    grads,
    walk,
)

BATCH = True  # every pass's steps of a node asked at once (``aggregate_passes``); False: pass by pass


def aggregate(
    split: Split,
    cg: ClassGrid,
    dtype: torch.dtype,
    rates: Rates,
    training: bool,
    input_grad: bool,
    input_copy: bool,
    memo: dict,
) -> TileWalk:
    """The grid's tiles summed (times, work, nodes) with the largest tile's peaks."""
    return aggregate_passes([(split, cg, input_copy, memo)], dtype, rates, training, input_grad)[0]


def aggregate_passes(
    passes: list[tuple], dtype: torch.dtype, rates: Rates, training: bool, input_grad: bool
) -> list[TileWalk]:
    """``aggregate`` of each pass (split, class grid, input copied, memo). A node's steps in every
    pass are asked at once (``step_batch.steps_many``): a squeeze-and-excitation network's passes
    repeat most nodes, each on rows of its own."""
    item = torch.empty((), dtype=dtype).element_size()
    share = RowShare()  # the passes' nodes share most rows
    prepared = [_prepare(split, cg, item, rates, input_grad, copy, share) for split, cg, copy, _ in passes]
    share.build(combos_many)  # every pass's distinct rows at once
    prepared = [p and _built(p, share) for p in prepared]
    calls = [(p[0].split, node, rows, g) for p in prepared if p for node, (rows, g, _, _) in p[2].items()]
    if BATCH:
        found = iter(steps_many(calls, item, rates))
    else:
        found = (steps_of(s, node, rows, item, rates, g) for s, node, rows, g in calls)
    out = []
    for (split, cg, copy, memo), p in zip(passes, prepared, strict=True):
        if p is None:  # not separable: each class walked
            out.append(TileWalk())
            for c in cg.listed:
                one = walk(split, c.need, c.writes, dtype, rates, training, input_grad, copy, memo)
                out[-1].add(one, c.count)
        else:
            steps = {node: (next(found), t, index, rows.numel) for node, (rows, _, t, index) in p[2].items()}
            out.append(summed(cg, *p[:2], steps, item, rates, training, copy))
    return out


def _prepare(split: Split, cg: ClassGrid, item: int, rates: Rates, input_grad: bool, input_copy: bool,
             share: RowShare):  # fmt: skip
    """(grid, grads, per node (``_node_rows``' ticket and combinations, grad_in)) of a separable
    class grid, or None: ``_built`` once ``share`` built the rows."""
    if not cg.separable:
        return None
    grid = _Grid(split, cg)
    grad = grads(split, grid.row(0)[1], input_grad)
    nodes = {}
    for node in list(grad)[1:]:  # the image first: it has no step
        nodes[node] = *_node_rows(split, grid, node, input_copy, rates, share), grad_in(split, node, grad)
    return grid, grad, nodes


def _built(prepared: tuple, share: RowShare) -> tuple:
    """(grid, grads, per node (rows, grad_in, tiles, class index)) of ``_prepare``'s, its rows built."""
    grid, grad, nodes = prepared
    out = {}
    for node, (ticket, combination, g) in nodes.items():
        rows, tiles, inverse = share.rows(ticket)
        out[node] = rows, g, tiles, inverse[combination]
    return grid, grad, out


class _Grid:
    """The kinds of grid index per dimension, with their diagonal rows and tile counts."""

    def __init__(self, split: Split, cg: ClassGrid) -> None:
        self.split, self.row, self.geometry = split, cg.diagonal.working_row, cg.geometry
        self.visit = cg.diagonal.visit  # working row j's block and its place there (``box_lengths``)
        self.reps = [[j for _, j in kinds] for kinds in cg.per_dim]
        self.counts = [np.array([n for n, _ in kinds], dtype=np.int64) for kinds in cg.per_dim]
        self._counts = [c.tolist() for c in self.counts]
        self._geometries: dict = {}  # per input copied or not: ``geometry_features``'s rows
        self._combinations: dict = {}  # ``combinations`` by the features' ids
        self._columns: dict = {}  # ``geometry_features`` along a dimension by its values' identities
        self._nodes: dict = {}  # per input copied or not: every node's ``geometry_features`` (or None)
        self.shape = tuple(len(r) for r in self.reps)

    def features(self, feature) -> list[tuple[np.ndarray, list, list, list]]:
        """Per dimension: the id of each kind's ``feature(j, d)`` (j: its diagonal row), and per
        distinct feature a row that has it, the number of grid indices that have it, and its value."""
        return self._features([[feature(j, d) for j in reps] for d, reps in enumerate(self.reps)])

    def geometry_features(self, node, copy: bool) -> list[tuple[np.ndarray, list, list, list]]:
        """``features`` of ``node``'s step geometry along each dimension (``steps.geometries``), read
        off the kinds' geometries directly: the planner asks per node and pass. Every node's at once
        from the blocks' arrays (``kind_columns.node_columns``) where each kind's row has them."""
        if copy not in self._nodes:
            self._nodes[copy] = node_columns(self.geometry, self.reps, self._counts, copy)
        if self._nodes[copy] is not None:
            return self._nodes[copy][node]
        if copy not in self._geometries:  # per dimension, each kind's geometries of every node
            self._geometries[copy] = [[self.geometry(j, copy) for j in reps] for reps in self.reps]
        out = []
        for d, gs in enumerate(self._geometries[copy]):
            values = [g[node][d] for g in gs]
            key = (d, *map(id, values))  # kept alive by ``_geometries``: ids not reused
            if key not in self._columns:
                self._columns[key] = self._column(d, values)
            out.append(self._columns[key])
        return out

    def _features(self, values: list[list]) -> list[tuple[np.ndarray, list, list, list]]:
        """``features`` from each kind's feature value per dimension."""
        return [self._column(d, column) for d, column in enumerate(values)]

    def _column(self, d: int, values: list) -> tuple[np.ndarray, list, list, list]:
        """``features`` along dimension d from each kind's feature value there."""
        ids: dict = {}
        firsts, tiles = [], []  # per distinct feature: its first row, the grid indices that have it
        index = []
        for j, n, value in zip(self.reps[d], self._counts[d], values, strict=True):
            f = ids.setdefault(value, len(ids))
            if f == len(firsts):
                firsts.append(j), tiles.append(0)
            tiles[f] += n
            index.append(f)
        return tuple(index), firsts, tiles, list(ids)

    def combinations(self, per_dim: list[tuple]) -> np.ndarray:
        """Per class (row-major), the number of its combination of per-dimension features (numbered
        row-major too), from ``features``' ids; nodes share few partitions of the kinds: cached."""
        key = tuple(f[0] for f in per_dim)
        if key not in self._combinations:
            counts = [len(f[1]) for f in per_dim]
            ids = [np.array(f[0], dtype=np.int64) * math.prod(counts[d + 1 :]) for d, f in enumerate(per_dim)]
            self._combinations[key] = self.mesh(ids, np.add)
        return self._combinations[key]

    def mesh(self, per_dim: list[np.ndarray], combine=np.multiply) -> np.ndarray:
        """Per class (the grid's kinds, row-major), the per-dimension values combined (a product)."""
        out = per_dim[0].reshape([-1] + [1] * (len(self.shape) - 1))
        for d, values in enumerate(per_dim[1:], 1):
            out = combine(out, values.reshape([-1 if e == d else 1 for e in range(len(self.shape))]))
        return np.broadcast_to(out, self.shape).reshape(-1)

    def box_lengths(self, pick) -> list[list[int]]:
        """Per dimension, each kind's length along it of one box of its diagonal row: the box whose
        index in a block's arrays is ``pick(block)`` (``tiles.Block``: the sinks' write boxes, then
        ``place[node]``), read off the diagonal's blocks as ``row(j)``'s boxes would give it
        (``Box.length``) without making every box of the row."""
        out = []
        for d, reps in enumerate(self.reps):
            lengths = []
            for j in reps:
                block, r = self.visit(j)
                b = pick(block)
                n = int(block.hi[b, d, r]) - int(block.lo[b, d, r])
                lengths.append(n if n > 0 else 0)
            out.append(lengths)
        return out

    def lengths(self, node) -> list[np.ndarray]:
        return [np.array(v, dtype=np.int64) for v in self.box_lengths(lambda block: block.place[node])]

    def numels(self, node) -> tuple[np.ndarray, np.ndarray]:
        """(tiles, positions of ``node``'s box), arrays with an entry per combination of its distinct
        lengths per dimension."""
        per_dim = self._features(self.box_lengths(lambda block: block.place[node]))  # the values: lengths
        tiles = _outer([np.array(f[2], dtype=np.float64) for f in per_dim], np.multiply)
        numels = _outer([np.array(f[3], dtype=np.int64) for f in per_dim], np.multiply)
        return tiles, numels


def _node_rows(split, grid: _Grid, node, input_copy: bool, rates, share: RowShare) -> tuple:
    """(``share``'s ticket for the rows of ``node``'s distinct steps over the grid (``steps.steps_of``
    builds them on arrays), the tiles that run each and the distinct row of each combination of its
    per-dimension geometries; per class (row-major), its combination).

    A step's cost depends on its geometry only through products over dimensions (positions of
    its box, of its inputs' boxes, of its padded input, of a transposed convolution's input) and
    whether it is padded or copied (``steps.steps_of``). Those are counted on arrays over every
    combination of the per-dimension geometries, and one step is built per distinct set of them:
    a 3D grid with 10 kinds per dimension has 1,000 combinations, and tiles that differ by a
    permutation of dimensions share a step. A CPU convolution also depends on the shape of its
    input (torch picks its kernel by shape: ``conv_rates.backends_of``), which the key then holds too.
    Nodes and passes with the same geometries share their rows (``node_rows.RowShare``).
    """
    per_dim = grid.geometry_features(node, input_copy)
    op = split.ops[node]
    boxes = [node, *(i for i in op.inputs if i in grid.row(0)[1])]
    shaped = not rates.gpu and rates.measured and isinstance(op, (Conv, ConvTranspose))

    def lengths() -> list:  # per dimension, per distinct geometry along it (``_lengths``)
        return [[_lengths(op, boxes, grid.row(j)[1], d) for j in f[1]] for d, f in enumerate(per_dim)]

    return share.get(node, op, per_dim, boxes, shaped, lengths), grid.combinations(per_dim)


def _lengths(op, boxes: list, need: dict, d: int) -> list[int]:
    """Along dimension d: the lengths of the node's box and its inputs' boxes, of the input box its
    window reads (padding included; 1 if none) and of a transposed convolution's input (or 1)."""
    box = need[boxes[0]]
    padded = 1
    if isinstance(op, Window):
        lo, hi = padded_bounds(op, box)
        padded = max(hi[d] - lo[d], 0)
    extra = op.needs(box)[0].length(d) if isinstance(op, ConvTranspose) else 1
    return [need[n].length(d) for n in boxes] + [padded, extra]


def _outer(per_dim: list[np.ndarray], combine) -> np.ndarray:
    """Per combination of one entry per dimension (row-major), the entries combined: (combinations,
    ...) for per-dimension arrays of (entries, ...)."""
    out = per_dim[0]
    for values in per_dim[1:]:
        out = combine(out[:, None], values[None, :]).reshape((-1,) + values.shape[1:])
    return out
