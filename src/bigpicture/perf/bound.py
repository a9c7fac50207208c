"""A lower bound of a tile's predicted time: the planner skips the full prediction
(``predict.predict_splits``) of tiles this already shows no faster than its best.

A prediction sums, over the grid's tiles and nodes, each step's seconds (``steps.steps_of``), and
adds the engine's per-node cost. A node's box in a tile is a product of per-dimension intervals
that depend on the tile's index in that dimension only, so the grid's steps of a node are the
combinations of its per-dimension geometries, each run by the product of their tile counts:

    per dimension   the lengths of every node's box at every index: the rows near the borders
                    and one period of the interior (``grid.dim_keys``; the interior repeats it),
                    from the diagonal rows the prediction reads too (``grid.diagonal_of``)
    per node        its lengths and its inputs' per dimension, combined over the dimensions
                    --> ``steps.steps_of`` on those rows: the prediction's own step seconds

What the lengths do not say is left out, each of which only adds to a step's seconds (``steps_of``
with ``least``): the padded or contiguous copy of a window's input (nothing is copied), and a
normalisation reading a strided view (the faster of its two rates counts). Exact otherwise: the
rates, torch's backend for each input shape, thread wake-ups, the gradient sums of values read
twice, the training step's last tile (the forward keeps its graph), the engine's cost per node and
tile. So the bound is the prediction's time less the copies, mostly at the image border: 0.94-1.00
of it on the census networks at 16,384^2. It costs nearly a prediction, so it comes last, per pass,
only while the cheaper levels leave the sum below the best time so far:

    engine_bound   the engine's cost per node and tile (nothing walked)
    work_bound     each step's work at the fastest rate it can get (``work_bound.py``: 0.5-0.7 of
                   the prediction on the CPU, a few ms per pass)
    pass_bound     the above (unknown where the product rule does not hold: a sink without work in
                   some tile, an empty box; or for fused steps, compiled tiles)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from bigpicture.engine.diagonals import walk_together
from bigpicture.engine.plan import tile_of
from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose
from bigpicture.engine.split import Split
from bigpicture.engine.tiles import Layout, layout, working_counts
from bigpicture.perf.grid import diagonal_of, dim_keys
from bigpicture.perf.predict import _setting
from bigpicture.perf.rates import Rates
from bigpicture.perf.row_memo import join_rows
from bigpicture.perf.steps import Rows, steps_of
from bigpicture.perf.strides import strides_of
from bigpicture.perf.walk import accumulation_s, bytes_of, grad_in, grads, readers
from bigpicture.perf.work_bound import work_bound


def time_bound(
    splits: list[Split], input_shape, dtype: torch.dtype, tile, device, training: bool, shared: dict,
    target: float = math.inf,
) -> float:  # fmt: skip
    """A lower bound of ``predict.predict_splits(splits, input_shape, dtype, tile, device, training,
    shared=shared).time``, made tighter only while it is below ``target``: per pass, first the
    engine's cost alone (``engine_bound``, nothing walked), then the work at the fastest rates
    (``work_bound.work_bound``), then the prediction's own step seconds (``pass_bound``); each level
    over the passes last first (the whole network: usually the most of the time)."""
    _, rates, _, shared = _setting(device, dtype, None, shared)
    memo = shared.setdefault(("bound", "rates"), {})  # the rates' maxima (work_bound.py)
    lays = [layout(s, input_shape, tile_of(tile, k)) for k, s in enumerate(splits)]
    levels = [engine_bound(s, lay, rates, training) for s, lay in zip(splits, lays, strict=True)]
    total = sum(levels)
    if total >= target:
        return total
    item, known, ahead, fulls = torch.empty((), dtype=dtype).element_size(), {}, [2], {}
    per_split = shared.setdefault(("bound", "grads"), {})  # id(split) -> (split, its grads)

    def full(k: int) -> bool:  # whether pass k's every tile has work in every sink
        if k not in fulls:
            s, lay = splits[k], lays[k]
            fulls[k] = not getattr(rates, "fused", False) and all(working_counts(s, lay, sink) == lay.grid
                                                                  for sink in s.sinks)  # fmt: skip
        return fulls[k]

    def tables(k: int):  # (dim_tables, grads) of pass k, or None where the product rule does not hold
        if k not in known:
            s, lay = splits[k], lays[k]
            if full(k) and not diagonal_of(s, lay)._blocks:  # the next passes' diagonals walked with it
                chunk = [j for j in reversed(range(k + 1)) if full(j)][: ahead[0]]
                walk_together([diagonal_of(splits[j], lays[j]) for j in chunk])
                ahead[0] *= 2
            t = dim_tables(s, lay) if full(k) else None
            known[k] = None if t is None else (t, _grads(s, lay, per_split))
        return known[k]

    def work(k: int):
        found = tables(k)
        return None if found is None else work_bound(splits[k], found[0], lays[k].grid, item, rates,
                                                     training, found[1], memo)  # fmt: skip

    for k in reversed(range(len(splits))):
        seconds = work(k)
        if seconds is not None and seconds > levels[k]:
            total, levels[k] = total + seconds - levels[k], seconds
            if total >= target:
                return total
    # the tight level over chunks of passes, 1, 2, 4, ... (each node's steps asked once per chunk)
    rest, size = [k for k in reversed(range(len(splits))) if tables(k) is not None], 1
    while rest and total < target:
        chunk, rest, size = rest[:size], rest[size:], 2 * size
        found = pass_bounds([(splits[k], lays[k], tables(k)) for k in chunk], dtype, rates, training)
        for k, seconds in zip(chunk, found, strict=True):
            if seconds > levels[k]:
                total, levels[k] = total + seconds - levels[k], seconds
    return total


def _grads(split: Split, lay: Layout, per_split: dict) -> dict:
    """``walk.grads`` of the first diagonal row of a pass whose ``dim_tables`` are made, kept per split:
    no box of theirs is empty (the tables hold row 0's positive lengths along every dimension), and
    ``grads`` reads of the boxes only which are empty: one answer for every layout."""
    found = per_split.get(id(split))
    if found is None or found[0] is not split:
        found = per_split[id(split)] = (split, grads(split, diagonal_of(split, lay).row(0)[1], False))  # kept
    return found[1]


def engine_bound(split: Split, lay: Layout, rates: Rates, training: bool) -> float:
    """A lower bound of a pass's predicted time from its number of tiles alone: the engine's own
    seconds per node and tile, which every phase pays at least (a GPU's phase takes the longer of
    its device and host times; the CPU's adds them). Counted: the tiles some sink writes in
    (``tiles.working_counts``), each computing at least the nodes the sink depends on (a non-empty
    box needs non-empty inputs)."""
    grad_node_s = rates.train_node_s / 2
    per_tile = min(rates.node_s, grad_node_s) + 2 * grad_node_s if training else rates.node_s
    least = 0.0
    for sink in split.sinks:  # the tiles where this sink writes compute at least its ancestors
        tiles, nodes = math.prod(working_counts(split, lay, sink)), _ancestor_count(split, sink)
        least = max(least, tiles * nodes * per_tile - (nodes * grad_node_s if training else 0.0))
    return least


def _ancestor_count(split: Split, sink) -> int:
    """``len(_ancestors(split, sink))``, cached by split and sink (asked per candidate tile and pass)."""
    key = (id(split), sink)
    found = _ANCESTORS.get(key)
    if found is None or found[0] is not split:
        if len(_ANCESTORS) >= 4096:
            _ANCESTORS.pop(next(iter(_ANCESTORS)))
        found = _ANCESTORS[key] = (split, len(_ancestors(split, sink)))  # the split kept: its id not reused
    return found[1]


_ANCESTORS: dict = {}


def _ancestors(split: Split, sink) -> set:
    """The spatial nodes ``sink`` is computed from (itself included, the image not)."""
    seen, todo = set(), [sink]
    while todo:
        node = todo.pop()
        if node in seen or node is split.input or split.roles.get(node) != "spatial":
            continue
        seen.add(node)
        todo.extend(node.all_input_nodes)
    return seen


def pass_bound(
    split: Split, lay: Layout, dtype: torch.dtype, rates: Rates, training: bool, found: tuple
) -> float:
    """A lower bound of the predicted time of one pass (``predict._predict_pass``) with layout ``lay``,
    whose every tile has work in every sink; ``found``: (its ``dim_tables``, ``walk.grads`` of its
    diagonal's first row)."""
    return pass_bounds([(split, lay, found)], dtype, rates, training)[0]


class _Part(NamedTuple):
    """A node's steps in one pass: what ``pass_bounds`` reads of ``steps.steps_of``."""

    inputs: tuple
    fwd_s: np.ndarray
    bwd_s: np.ndarray
    kind: np.ndarray


def pass_bounds(passes: list[tuple], dtype: torch.dtype, rates: Rates, training: bool) -> list[float]:
    """``pass_bound`` of each of ``passes`` ((split, layout, found)): a node's steps are asked once
    over its rows in all of them (the passes of global statistics recompute the nodes before
    them: a squeeze-and-excitation network's 17-34 passes share most nodes, each its own boxes)."""
    item = torch.empty((), dtype=dtype).element_size()
    combos: list[dict] = [{} for _ in passes]
    groups: dict = {}  # steps_of's call for each node, over the passes where its step reads alike
    for k, (split, _, (tables, grad)) in enumerate(passes):
        listed = [(t.lengths.tolist(), t.counts.tolist()) for t in tables]
        for node in list(grad)[1:]:  # the image first: it has no step
            c = combos[k][node] = _combos(split, node, tables, listed)
            key = (node, id(split.ops[node]), grad_in(split, node, grad), tuple(i for i, _ in c.rows.inputs))
            groups.setdefault(key, []).append(k)
    steps: list[dict] = [{} for _ in passes]
    for (node, _, grad_input, _), ks in groups.items():
        rows = [combos[k][node].rows for k in ks]
        st = steps_of(passes[ks[0]][0], node, join_rows(rows), item, rates, grad_input, least=True)
        start = 0
        for k, r in zip(ks, rows, strict=True):
            at = slice(start, start + len(r.numel))
            steps[k][node], start = _Part(st.inputs, st.fwd_s[at], st.bwd_s[at], st.kind[at]), at.stop
    return [_seconds(*p, combos[k], steps[k], item, rates, training) for k, p in enumerate(passes)]


def _seconds(split: Split, lay: Layout, found: tuple, combos: dict, steps: dict, item: int, rates: Rates,
             training: bool) -> float:  # fmt: skip
    """One pass's bound from its nodes' steps (``pass_bounds``)."""
    grad = found[1]
    fwd = last_fwd = bwd = 0.0
    ops = last_ops = 0
    for node, st in steps.items():
        c = combos[node]
        fwd, last_fwd = fwd + float(c.tiles @ st.fwd_s), last_fwd + float(st.fwd_s[c.last])
        bwd += float(c.tiles @ st.bwd_s) if training and grad[node] else 0.0
        works = st.kind != "view"
        ops, last_ops = ops + int(c.tiles[works].sum()), last_ops + int(works[c.last])
    if training:  # a value read by several steps: its gradients summed (``walk.accumulation_s``)
        for i, r in readers(list(steps.values()), grad):
            sizes = bytes_of(split, i, combos[i].rows.numel, item)
            bwd += float(combos[i].tiles @ accumulation_s(sizes, r, rates))
    tiles, nodes = math.prod(lay.grid), len(grad) - 1
    grad_node_s = rates.train_node_s / 2
    # as ``predict._time``: the forward keeps the last tile's graph (its nodes with autograd), the
    # recompute runs every other tile
    phases = [(fwd, tiles * nodes * rates.node_s + ops * rates.host_op_s
               + nodes * (grad_node_s - rates.node_s) * training)]  # fmt: skip
    if training:
        phases += [
            (fwd - last_fwd, (tiles - 1) * nodes * grad_node_s + (ops - last_ops) * rates.host_op_s),
            (bwd, tiles * nodes * grad_node_s + ops * rates.host_op_s),
        ]
    if rates.gpu:  # the host runs ahead of the GPU: a phase takes the longer of the two
        return sum(max(device, host) for device, host in phases)
    return sum(device + host for device, host in phases)


@dataclass(frozen=True)
class DimTable:
    """Along one dimension: every distinct row of lengths (one column per feature: each node's box
    length, then each transposed convolution's input length), the grid indices that have it, and
    the row of the last index."""

    columns: dict  # (node, "box" or "input") -> column
    lengths: np.ndarray  # (distinct, columns)
    counts: np.ndarray  # (distinct,)
    last: int


def dim_tables(split: Split, lay: Layout) -> list[DimTable] | None:
    """A ``DimTable`` per dimension, exact (``grid.dim_keys``: the rows near the borders and one
    period of the interior); None if a box is empty (the product rule does not hold)."""
    diagonal = diagonal_of(split, lay)
    rows = diagonal.row
    nodes = diagonal.visit(0)[0].nodes if min(diagonal.working) > 0 else list(rows(0)[1])  # row 0's nodes
    transposed = [n for n in nodes if isinstance(split.ops.get(n), ConvTranspose)]
    columns = {**{(n, "box"): k for k, n in enumerate(nodes)},
               **{(n, "input"): len(nodes) + k for k, n in enumerate(transposed)}}  # fmt: skip
    spans: dict = {}  # per block of diagonal rows: its nodes' lengths (nodes, dimensions, rows)
    tables = []
    for d in range(split.nd):
        if d and not transposed and _mirrors(split, lay, diagonal, d):
            tables.append(tables[0])  # the same rows of lengths, counts and last row
            continue
        seen: dict = {}

        def lengths(j, d=d, seen=seen) -> tuple:
            if j not in seen:
                if j < diagonal.working[d]:  # row j's boxes along d: those of its block's arrays
                    block, r = diagonal.visit(j)
                    if block.start not in spans:
                        at = [block.place[n] for n in nodes]
                        spans[block.start] = block.hi[at].astype(np.int64) - block.lo[at]
                    box = tuple(spans[block.start][:, d, r].tolist())
                else:  # past the tiles with work along d: ``Diagonal.row`` empties them
                    need = rows(j)[1]
                    box = tuple(need[n].hi[d] - need[n].lo[d] for n in nodes)
                seen[j] = box + tuple(split.ops[n].needs(rows(j)[1][n])[0].length(d) for n in transposed)
            return seen[j]

        per_index = dim_keys(split, lay, rows, d, lengths)
        distinct: dict = {}
        for t in per_index:
            distinct[t] = distinct.get(t, 0) + 1
        table = np.array(list(distinct), dtype=np.int64).reshape(len(distinct), len(columns))
        if (table[:, : len(nodes)] <= 0).any():
            return None
        counts = np.array(list(distinct.values()), dtype=np.int64)
        tables.append(DimTable(columns, table, counts, list(distinct).index(per_index[-1])))
    return tables


def _mirrors(split: Split, lay: Layout, diagonal, d: int) -> bool:
    """Whether ``dim_tables``' walk along d reads what it read along dimension 0: the same grid,
    strides and tiles with work (every tile: no row is read as ``Box`` objects), and every box of
    every block walked so far (among them every row read along 0) the same along d as along 0 (a
    square input of a network of square kernels). Then the walk along d takes the same steps on the
    same numbers, and its table is the same."""
    strides, grid, working = strides_of(split), lay.grid, diagonal.working
    same = (lay.intervals[d] == lay.intervals[0] and lay.tile[d] == lay.tile[0]
            and working[d] == grid[d] == working[0] == grid[0]
            and strides.values[d] == strides.values[0] and strides.group[d] == strides.group[0])  # fmt: skip
    return same and all(
        np.array_equal(block.lo[:, d], block.lo[:, 0]) and np.array_equal(block.hi[:, d], block.hi[:, 0])
        for block in diagonal._blocks.values()
    )


@dataclass(frozen=True)
class Combos:
    rows: Rows  # the node's distinct steps over the grid (nothing copied)
    tiles: np.ndarray  # tiles running each
    last: int  # the step of the grid's last tile


def _combos(split: Split, node, tables: list[DimTable], listed: list | None = None) -> Combos:
    """The distinct geometries of ``node``'s step over the grid (its box, its inputs' boxes, a
    window's padded input, a transposed convolution's input) and the tiles that run each: per
    dimension the distinct rows of its columns, combined over the dimensions. ``listed``: per table,
    its lengths and counts as lists (made once per pass)."""
    op = split.ops[node]
    cols = [tables[0].columns[node, "box"]]
    cols += [tables[0].columns[i, "box"] for i in op.inputs if (i, "box") in tables[0].columns]
    cols += [tables[0].columns[node, "input"]] if isinstance(op, ConvTranspose) else []
    combos, counts, last = [()], [1], 0  # in Python: a few rows per dimension, a few numpy calls in all
    for t, (rows, ns) in zip(tables, listed or [(t.lengths.tolist(), t.counts.tolist()) for t in tables],
                             strict=True):  # fmt: skip
        distinct: dict = {}  # a few rows: tuples are quicker than np.unique
        keys = [tuple([r[c] for c in cols]) for r in rows]
        for key, n in zip(keys, ns, strict=True):
            distinct[key] = distinct.get(key, 0) + n
        # every combination so far with each of these rows, the latest dimension fastest
        combos = [c + (key,) for c in combos for key in distinct]
        counts = [a * b for a in counts for b in distinct.values()]
        last = last * len(distinct) + list(distinct).index(keys[t.last])
    lengths = np.array(combos, dtype=np.int64)  # (combinations, dimensions, columns)
    tiles = np.array(counts, dtype=np.int64)
    numel = lengths.prod(axis=1)
    own = lengths[:, :, 0]
    if isinstance(op, Window):  # ``Window.padded_box``: the input box its output box reads, padding included
        step, dil, kernel = (np.array(v, dtype=np.int64) for v in (op.step, op.dilation, op.kernel))
        padded = (own - 1) * step + dil * (kernel - 1) + 1
    else:
        padded = np.ones_like(own)
    extra = lengths[:, :, -1] if isinstance(op, ConvTranspose) else np.ones_like(own)
    inputs = [i for i in op.inputs if (i, "box") in tables[0].columns]
    no = np.zeros(len(numel), dtype=bool)
    rows = Rows(numel[:, 0], tuple((i, numel[:, 1 + k]) for k, i in enumerate(inputs)), padded, extra, no, no)
    return Combos(rows, tiles, last)
