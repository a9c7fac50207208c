"""A cheap lower bound of a pass's predicted time: each step's work at the fastest rate its op can get.

The tight bound (``bound.pass_bound``) asks ``steps.steps_of`` for every combination of a node's
per-dimension box lengths: the prediction's own rates, per shape (a CPU convolution's backend and
calibrated rate per input box), nearly the cost of a prediction. Here every step's seconds are its
work over a rate no row can beat, so they are linear in the positions of its boxes, and a node's
positions summed over the grid are a product over dimensions of its lengths summed along each
(``bound.dim_tables``: the same per-dimension tables):

    convolution    flops / the largest rate its query can reach: a CPU calibration interpolates
                   between measured points (a weighted mean: at most the largest it weighs: the
                   table of its kernel and stride class, the corners of its channel counts, any
                   backend and size), a GPU's formula at full quantization (its NCHW <-> NHWC
                   transposes at the stream peak), 0.5 x peak on an uncalibrated CPU
    pooling        the larger of its window over the fastest pooling rate and its bytes over the
                   fastest stream rate
    memory-bound   bytes / the fastest rate of its kind (a norm: of its plain and strided tables)

plus what does not depend on the rates, exactly as the prediction counts it: the engine's cost per
node and tile, per op on the host, the wake-up of the threads by every convolution and pooling step
(and by ops that are large in every tile), the gradient sums of the parameters. Left out (each
only adds): the padded copies, the gradient sums of values read twice, wake-ups of ops small in
some tile. A training step's recompute skips the last tile: its positions are those of the last
row along every dimension.
"""

from __future__ import annotations

import bisect
import math
from typing import NamedTuple

import numpy as np
import torch

from bigpicture.engine.rules.resample import ConvTranspose, Pad, Resample, Slice
from bigpicture.engine.rules.window import Conv, Pool
from bigpicture.engine.split import Split
from bigpicture.perf.rates import (
    _VALUES,
    GPU_CONV_EFFICIENCY,
    PARALLEL_ELEMENTS,
    WINOGRAD_3X3,
    Rates,
    _grid_table,
)
from bigpicture.perf.steps import (
    _SAVE_NOTHING,
    _SAVE_OUTPUT,
    _VIEWS,
    _facts,
    _gradient_sum_s,
    _stream_kind,
)
from bigpicture.perf.walk import grad_in

MARGIN = 1 + 1e-9  # interpolated rates may round a hair above the largest point they weigh


def work_bound(split: Split, tables: list, grid: tuple, item: int, rates: Rates, training: bool, grad: dict,
               memo: dict) -> float:  # fmt: skip
    """A lower bound of ``bound.pass_bound`` (so of the pass's prediction) from ``tables``
    (``bound.dim_tables`` of its layout), ``grad`` (``walk.grads`` of its diagonal's first row);
    ``memo``: the rates' maxima and the nodes' facts, kept between calls (the search's ``shared``).

    Each node's numbers are two (every tile, every tile but the last): Python floats, whose
    operations round as numpy's float64 do, without numpy's cost per call on two entries."""
    columns = tables[0].columns
    every = np.prod([t.counts @ t.lengths for t in tables], axis=0).astype(np.float64)
    last = np.prod([t.lengths[t.last] for t in tables], axis=0).astype(np.float64)
    least = np.prod([t.lengths.min(axis=0) for t in tables], axis=0)
    most = np.prod([t.lengths.max(axis=0) for t in tables], axis=0)
    at = _At((every.tolist(), (every - last).tolist()), (least.tolist(), most.tolist()), item, rates, memo)
    tiles = math.prod(grid)
    woken = (float(tiles) * rates.wake_s, float(tiles - 1) * rates.wake_s)
    fwd0 = fwd1 = bwd = 0.0
    works = 0
    for node, fact in zip(list(grad)[1:], _node_facts(memo, split, list(grad)[1:], columns), strict=True):
        (f0, f1), b, w = _node(split, node, fact, at, woken, grad)  # the image first: it has no step
        fwd0, fwd1, works = fwd0 + f0, fwd1 + f1, works + w
        bwd += b + float(tiles) * _gradient_sum_s(split, node, rates) if training and grad[node] else 0.0
    nodes, grad_node_s = len(grad) - 1, rates.train_node_s / 2
    ops = tiles * works  # as ``bound.pass_bound``'s phases
    phases = [(fwd0, tiles * nodes * rates.node_s + ops * rates.host_op_s
               + nodes * (grad_node_s - rates.node_s) * training)]  # fmt: skip
    if training:
        phases += [
            (fwd1, (tiles - 1) * nodes * grad_node_s + (ops - works) * rates.host_op_s),
            (bwd, tiles * nodes * grad_node_s + ops * rates.host_op_s),
        ]
    if rates.gpu:
        return sum(max(device, host) for device, host in phases)
    return sum(device + host for device, host in phases)


class _At(NamedTuple):
    """What a pass's nodes are bounded at: per column of the tables, its positions summed over
    every tile and every tile but the last, its least and most positions in a tile."""

    positions: tuple[list, list]
    ranges: tuple[list, list]
    item: int
    rates: Rates
    memo: dict


class _Fact(NamedTuple):
    """What ``_node`` reads of a node that the layout does not change (``_node_facts``)."""

    kind: str  # "conv", "pool", "view" or a stream kind
    box: int  # its box's column
    positions: int  # the column of a convolution's positions (a transposed one's: its input's)
    nc: int  # batch x channels
    ins: tuple  # per spatial input: (its batch x channels, its column)
    saves: bool  # a stream op saves for its backward
    conv: _Conv | None  # a convolution's numbers


class _Conv(NamedTuple):
    """What ``_conv_seconds`` reads of a convolution (``steps._conv_steps``' numbers), kept per op."""

    n: int  # batch
    c: int  # output channels
    stride: int  # its largest step
    kernel: int  # kernel positions
    fan_in: int  # input channels x kernel positions per output (a transposed one's: every input channel's)
    cq: int  # input channels per group (a transposed one's: all of them)
    transposed: bool
    groups: int


def _node_facts(memo: dict, split: Split, nodes: list, columns: dict) -> list[_Fact]:
    """The ``_Fact`` of each of ``nodes``, kept per split (the search bounds its passes per candidate).
    What does not depend on the columns is kept per op (``_op_fact``): the passes of a network share
    their ops (a squeeze-and-excitation network's 17-51 passes, each bounded once per candidate)."""
    key = ("work facts", id(split))
    found = memo.get(key)
    if found is not None and found[0] is split and found[1] == nodes and found[2] == columns:
        return found[3]
    per_op = memo.setdefault("work op facts", {})
    facts = []
    for node in nodes:
        op = split.ops[node]
        known = per_op.get(id(op))
        if known is None or known[0] is not op or known[1] is not node or known[2] is not split.shapes:
            known = per_op[id(op)] = (op, node, split.shapes, _op_fact(split, node, op))  # the op kept
        kind, nc, inputs, saves, conv = known[3]
        ins = tuple((c, columns[i, "box"]) for c, i in inputs if (i, "box") in columns)
        box = columns[node, "box"]
        transposed = conv is not None and conv.transposed
        facts.append(_Fact(kind, box, columns[node, "input"] if transposed else box, nc, ins, saves, conv))
    memo[key] = (split, nodes, dict(columns), facts)  # the split is kept: its id is not reused
    return facts


def _op_fact(split: Split, node, op) -> tuple:
    """(kind, batch x channels, per input (its batch x channels, the input), whether a stream op
    saves for its backward, a convolution's ``_Conv``) of ``node``: ``_Fact`` but the columns."""
    n, c = split.shapes[node][:2]
    name, inplace, _ = _facts(split, node)
    inputs = tuple((math.prod(split.shapes[i][:2]), i) for i in op.inputs if i in split.shapes)
    saves = name in _SAVE_OUTPUT or (name not in _SAVE_NOTHING and not isinstance(op, (Pad, Resample)))
    if isinstance(op, (Conv, ConvTranspose)):
        kind = "conv"
    elif isinstance(op, Pool):
        kind = "pool"
    elif (name in _VIEWS or isinstance(op, (Slice, Pad))) and not inplace:  # nothing copied: Pad a view
        kind = "view"
    else:
        kind = _stream_kind(op, name)
    conv = None
    if kind == "conv":
        transposed, kernel = isinstance(op, ConvTranspose), math.prod(op.kernel)
        cin = split.shapes[op.inputs[0]][1]
        fan_in = cin * kernel if transposed else op.cin_per_group * kernel
        cq = cin // (1 if transposed else op.groups)
        conv = _Conv(n, c, max(op.step), kernel, fan_in, cq, transposed, op.groups)
    return kind, n * c, inputs, saves, conv


def _node(split: Split, node, fact: _Fact, at: _At, woken: tuple, grad: dict) -> tuple:
    """((forward seconds over every tile, over every tile but the last), backward seconds without the
    parameters' gradient sums, 1 if it is an op the host dispatches else 0) of ``node``, from below."""
    if fact.kind == "view":
        return (0.0, 0.0), 0.0, 0
    if fact.kind == "conv":
        full = grad_in(split, node, grad)
        f0, f1, b = _conv_seconds(split.nd, fact.conv, at, fact.positions, full)
        bwd = (2 if full else 1) * b
        bwd += woken[0] if not fact.conv.transposed else 0.0  # (an empty input box: no work)
        return (f0 + woken[0], f1 + woken[1]), bwd, 1
    (p0, p1), (lo, hi), item, rates, memo = at
    elems = (fact.nc * p0[fact.box], fact.nc * p1[fact.box])
    tile_elems = (fact.nc * lo[fact.box], fact.nc * hi[fact.box])  # in a tile: least, most
    acc0 = acc1 = 0.0  # the inputs' positions (floats, summed in order) and their least and most (ints)
    in_lo = in_hi = 0
    for nc, col in fact.ins:
        acc0, acc1 = acc0 + nc * p0[col], acc1 + nc * p1[col]
        in_lo, in_hi = in_lo + nc * lo[col], in_hi + nc * hi[col]
    moved = ((elems[0] + acc0) * item, (elems[1] + acc1) * item)
    tile_bytes = (item * (tile_elems[0] + in_lo), item * (tile_elems[1] + in_hi))
    if fact.kind == "pool":
        k = math.prod(split.ops[node].kernel)
        window, windows = (elems[0] * k, elems[1] * k), tuple(k * e for e in tile_elems)
        twice = tuple(2 * b for b in tile_bytes)
        pool = _most(memo, rates, "pool", False, windows)
        unary = _most(memo, rates, "unary", False, tile_bytes)
        fwd = tuple(max(w / pool, m / unary) + wake for w, m, wake in zip(window, moved, woken, strict=True))
        bwd = max(window[0] / _most(memo, rates, "pool", True, windows),
                  2 * moved[0] / _most(memo, rates, "unary", False, twice))  # fmt: skip
        return fwd, bwd + woken[0], 1
    large = tile_elems[0] >= PARALLEL_ELEMENTS  # woken in every tile
    rate = _most(memo, rates, fact.kind, False, tile_bytes)
    fwd = (moved[0] / rate + (woken[0] if large else 0.0), moved[1] / rate + (woken[1] if large else 0.0))
    bwd = 0.0
    if fact.saves:
        saved = tuple(3 * e * item for e in tile_elems)
        bwd = 3 * elems[0] * item / _most(memo, rates, fact.kind, True, saved) + (woken[0] if large else 0.0)
    return fwd, bwd, 1


def _conv_seconds(
    nd: int, conv: _Conv, at: _At, column: int, full: bool = True
) -> tuple[float, float, float]:
    """A convolution's forward seconds (``steps._conv_steps``) over every tile and every tile but the
    last, and its backward seconds over every tile (the input's or the weights' gradient; ``full``:
    at the full backward's rate, else at that of the weights' gradient alone), from below;
    ``column``: its positions' (a transposed one's: its input's)."""
    (p0, p1), (lo, hi), item, rates, memo = at
    n, c, stride, kernel, fan_in, cq, transposed, groups = conv
    positions = (n * p0[column], n * p1[column])
    if transposed:
        flops = (2 * positions[0] * fan_in * c / groups, 2 * positions[1] * fan_in * c / groups)
    else:
        flops = (2 * positions[0] * fan_in * c, 2 * positions[1] * fan_in * c)
    reach = (n * lo[column], n * hi[column])
    rate = _conv_rate_max(memo, rates, nd, cq, c, kernel, stride, fan_in, transposed, False, reach)
    back = _conv_rate_max(memo, rates, nd, cq, c, kernel, stride, fan_in, transposed, full or "weight", reach)
    f0, f1, b = flops[0] / rate, flops[1] / rate, flops[0] / back
    if rates.gpu and rates.peak > 1.01 * rates.device.peak("fp32") and not rates.channels_last:
        # ``rates.gpu_conv_rate``: cuDNN's transposes to NHWC and back, at the stream peak
        scale = stride**nd  # the other operand's positions per position
        per = 2 * item * (cq * (1 if transposed else scale) + c * (scale if transposed else 1))
        most = per * reach[1]  # the stream rate grows with the size: at most the largest tile's
        copy = _most(memo, rates, "copy", False, (most, most))
        f0, f1 = f0 + per * positions[0] / copy, f1 + per * positions[1] / copy
        b += per * positions[0] / copy
    return f0, f1, b


def _conv_rate_max(
    memo: dict, rates: Rates, nd: int, cin: int, cout: int, kernel: int, stride: int, fan_in: int,
    transposed: bool, backward: bool | str, reach: tuple[int, int],
) -> float:  # fmt: skip
    """The largest flops/s ``rates.conv`` gives this convolution at positions within ``reach``
    (least, most), any backend; kept per query (the passes of a candidate share most shapes)."""
    query = ("conv at", nd, cin, cout, kernel, stride, fan_in, transposed, backward, reach)
    found = memo.get(query)
    if found is None:
        found = memo[query] = _conv_rate_most(memo, rates, *query[1:])
    return found


def _conv_rate_most(
    memo: dict, rates: Rates, nd: int, cin: int, cout: int, kernel: int, stride: int, fan_in: int,
    transposed: bool, backward: bool | str, reach: tuple[int, int],
) -> float:  # fmt: skip
    """``_conv_rate_max``, found."""
    if rates.gpu:  # ``rates.gpu_conv_rate``: its quantization is at most 1
        tensor_cores = rates.peak > 1.01 * rates.device.peak("fp32")
        rate = rates.peak * GPU_CONV_EFFICIENCY * fan_in / (fan_in + (32 if tensor_cores else 8))
        winograd = nd == 2 and kernel == 9 and stride == 1 and not transposed
        if winograd and not tensor_cores and rates.dtype == torch.float32:
            rate *= WINOGRAD_3X3
        return rate * MARGIN
    if rates.ops is None or not rates._points(nd, transposed)[0]:
        return 0.5 * rates.peak * MARGIN
    value = _VALUES[backward]
    tables, anywhere = _conv_tables(memo, rates, nd, transposed, value, stride, kernel)
    # per table (one per backend), the positions of its grid the query's corners can reach
    spans = tuple(_span(axes[2], *reach) for _, axes in tables)
    key = ("conv", nd, transposed, value, stride > 1, kernel, cin, cout, spans)
    if key not in memo:
        best, nearest = 0.0, not tables
        for (table, axes), (i, j) in zip(tables, spans, strict=True):
            near = [(a, b) for a in _corners(axes[0], cin) for b in _corners(axes[1], cout)]
            found = [[table.get((a, b, p)) for a, b in near] for p in axes[2][i : j + 1]]
            best = max([best, *(r for per in found for r in per if r)])
            nearest = nearest or not all(any(per) for per in found)  # ``_table_rate`` may find no corner
        memo[key] = max(best, anywhere if nearest else 0.0) * MARGIN  # ``rates._nearest_logs``: a mean
    return memo[key]


def _conv_tables(memo: dict, rates: Rates, nd: int, transposed: bool, value: str, stride: int, kernel: int):
    """(the grid tables ``rates.conv`` may interpolate in for this kind of convolution, one per
    backend, none if the calibration is not a grid; the largest rate of any point)."""
    key = ("conv tables", nd, transposed, value, stride > 1, kernel)
    if key not in memo:
        points, gridded = rates._points(nd, transposed)
        backends = {p.get("backend") for p in points} | {None} if gridded else set()
        memo[key] = ([_grid_table(points, value, stride, kernel, b) for b in backends],
                     max(p[value] for p in points))  # fmt: skip
    return memo[key]


def _span(values: list, least, most) -> tuple[int, int]:
    """The indices of the first and last of the sorted ``values`` that the corners of a query
    between ``least`` and ``most`` can be (``_corners``)."""
    return values.index(_corners(values, least)[0]), values.index(_corners(values, most)[-1])


def _corners(values: list, q) -> list:
    """The grid values ``rates._table_rate`` weighs for a query ``q`` on one axis (sorted values:
    bisected, as ``_table_rate`` does)."""
    below, above = bisect.bisect_right(values, q), bisect.bisect_left(values, q)
    lo = values[below - 1] if below else values[0]
    hi = values[above] if above < len(values) else values[-1]
    return [lo] if hi <= lo else [lo, hi]


def _most(memo: dict, rates: Rates, kind: str, backward: bool, reach: tuple) -> float:
    """The largest rate ``rates`` gives an op of ``kind`` ("pool": window elements/s, else a stream's
    bytes/s, a norm's plain or strided) at sizes within ``reach`` (least, most). A CPU's rates
    interpolate between their table's points (piecewise linear in log size, constant beyond): at
    most the largest point of the segments ``reach`` spans; a GPU's stream rate grows with the size.
    Kept per query."""
    asked = ("most at", kind, backward, reach)
    if asked not in memo:
        memo[asked] = _most_found(memo, rates, kind, backward, reach)
    return memo[asked]


def _most_found(memo: dict, rates: Rates, kind: str, backward: bool, reach: tuple) -> float:
    """``_most``, found."""
    if rates.gpu or rates.ops is None:
        if kind == "pool":
            return math.inf
        return float(rates.streams(kind, np.array([reach[1]], dtype=np.float64), backward)[0]) * MARGIN
    tables = memo.get(("stream tables", kind, backward))
    if tables is None:
        tables = memo["stream tables", kind, backward] = _stream_tables(rates, kind, backward)
    spans = tuple(_span(xs, *reach) for xs, _ in tables)
    key = ("most", kind, backward, spans)
    if key not in memo:
        memo[key] = max(max(ys[i : j + 1]) for (_, ys), (i, j) in zip(tables, spans, strict=True)) * MARGIN
    return memo[key]


def _stream_tables(rates: Rates, kind: str, backward: bool) -> list[tuple[list, list]]:
    """The tables (sizes, rates) a CPU calibration interpolates an op of ``kind`` in (a norm: its
    plain and strided ones, ``steps._rates``)."""
    if kind == "pool":
        table = rates.ops["pool"]["backward" if backward else "forward"]
        return [([w for w, _ in table], [r for _, r in table])]
    forward = rates.ops["stream"]
    tables = rates.ops.get("stream_backward", {}) if backward else forward
    kinds = [kind, "norm_strided"] if kind == "norm" and "norm_strided" in tables else [kind]
    return [
        ([x for x, _ in t], [r for _, r in t]) for t in (tables.get(k) or forward["unary"] for k in kinds)
    ]
