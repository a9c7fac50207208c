"""The work bound as it was before its rewrite for speed (commit d74c489): the reference of
tests/test_plan_bound_exact.py, verbatim but for this line.

A cheap lower bound of a pass's predicted time: each step's work at the fastest rate its op can get.

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

import math

import numpy as np
import torch

from bigpicture.engine.rules.resample import ConvTranspose, Pad, Resample, Slice
from bigpicture.engine.rules.window import Conv, Pool
from bigpicture.engine.split import Split
from bigpicture.perf.rates import (
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
    ``memo``: the rates' maxima, kept between calls (the search's ``shared``)."""
    columns = tables[0].columns
    every = np.prod([t.counts @ t.lengths for t in tables], axis=0).astype(np.float64)
    last = np.prod([t.lengths[t.last] for t in tables], axis=0).astype(np.float64)
    least = np.prod([t.lengths.min(axis=0) for t in tables], axis=0)
    most = np.prod([t.lengths.max(axis=0) for t in tables], axis=0)
    positions = np.stack([every, every - last])  # (every tile, every tile but the last) x columns
    tiles = math.prod(grid)
    counts = np.array([tiles, tiles - 1], dtype=np.float64)
    fwd, bwd, works = np.zeros(2), 0.0, 0
    for node in list(grad)[1:]:  # the image first: it has no step
        f, b, w = _node(split, node, positions, (least, most), columns, counts, item, rates, grad, memo)
        fwd, works = fwd + f, works + w
        bwd += b if training and grad[node] else 0.0
    nodes, grad_node_s = len(grad) - 1, rates.train_node_s / 2
    ops = tiles * works  # as ``bound.pass_bound``'s phases
    phases = [(fwd[0], tiles * nodes * rates.node_s + ops * rates.host_op_s
               + nodes * (grad_node_s - rates.node_s) * training)]  # fmt: skip
    if training:
        phases += [
            (fwd[1], (tiles - 1) * nodes * grad_node_s + (ops - works) * rates.host_op_s),
            (bwd, tiles * nodes * grad_node_s + ops * rates.host_op_s),
        ]
    if rates.gpu:
        return sum(max(device, host) for device, host in phases)
    return sum(device + host for device, host in phases)


def _node(split: Split, node, positions, ranges, columns: dict, counts, item: int, rates: Rates, grad: dict,
          memo: dict) -> tuple:  # fmt: skip
    """(forward seconds over every tile and every tile but the last, backward seconds, 1 if it is
    an op the host dispatches else 0) of ``node``, from below; ``ranges``: the least and most
    positions of each column's box in a tile."""
    op, (n, c) = split.ops[node], split.shapes[node][:2]
    name, inplace, _ = _facts(split, node)
    own = positions[:, columns[node, "box"]]
    elems = n * c * own
    ins = [(i, positions[:, columns[i, "box"]]) for i in op.inputs if (i, "box") in columns]
    moved = (elems + sum((math.prod(split.shapes[i][:2]) * p for i, p in ins), np.zeros(2))) * item
    tile_elems = tuple(n * c * int(r[columns[node, "box"]]) for r in ranges)  # in a tile: least, most
    tile_bytes = tuple(
        item * (e + sum(math.prod(split.shapes[i][:2]) * int(r[columns[i, "box"]]) for i, _ in ins))
        for e, r in zip(tile_elems, ranges, strict=True)
    )
    woken = counts * rates.wake_s
    if isinstance(op, (Conv, ConvTranspose)):
        fwd = _conv_seconds(split, op, node, positions, ranges, columns, n, c, item, rates, memo)
        times = 2 if grad_in(split, node, grad) else 1
        args = (split, op, node, positions, ranges, columns, n, c, item, rates, memo)
        bwd = times * _conv_seconds(*args, True)[0]
        bwd += woken[0] if not isinstance(op, ConvTranspose) else 0.0  # (an empty input box: no work)
        return fwd + woken, bwd + _grads_s(split, node, rates, counts), 1
    if isinstance(op, Pool):
        k = math.prod(op.kernel)
        window, windows = elems * k, tuple(k * e for e in tile_elems)
        twice = tuple(2 * b for b in tile_bytes)
        fwd = np.maximum(window / _most(memo, rates, "pool", False, windows),
                         moved / _most(memo, rates, "unary", False, tile_bytes))  # fmt: skip
        bwd = max(window[0] / _most(memo, rates, "pool", True, windows),
                  2 * moved[0] / _most(memo, rates, "unary", False, twice))  # fmt: skip
        return fwd + woken, bwd + woken[0] + _grads_s(split, node, rates, counts), 1
    view = (name in _VIEWS or isinstance(op, (Slice, Pad))) and not inplace  # nothing copied: Pad a view
    if view:
        return np.zeros(2), _grads_s(split, node, rates, counts), 0
    kind = _stream_kind(op, name)
    saves = name in _SAVE_OUTPUT or (name not in _SAVE_NOTHING and not isinstance(op, (Pad, Resample)))
    large = tile_elems[0] >= PARALLEL_ELEMENTS  # woken in every tile
    fwd = moved / _most(memo, rates, kind, False, tile_bytes) + (woken if large else 0.0)
    bwd = 0.0
    if saves:
        saved = tuple(3 * e * item for e in tile_elems)
        bwd = 3 * elems[0] * item / _most(memo, rates, kind, True, saved) + (woken[0] if large else 0.0)
    return fwd, bwd + _grads_s(split, node, rates, counts), 1


def _grads_s(split: Split, node, rates: Rates, counts) -> float:
    """Every tile's backward adds the node's parameter gradients into the run's sums."""
    return float(counts[0]) * _gradient_sum_s(split, node, rates)


def _conv_seconds(split: Split, op, node, positions, ranges, columns: dict, n: int, c: int, item: int,
                  rates: Rates, memo: dict, backward: bool = False) -> np.ndarray:  # fmt: skip
    """A convolution's seconds (``steps._conv_steps``) over the positions, from below."""
    nd, transposed, stride = split.nd, isinstance(op, ConvTranspose), max(op.step)
    cin = split.shapes[op.inputs[0]][1]
    kernel = math.prod(op.kernel)
    column = columns[node, "input" if transposed else "box"]
    at = n * positions[:, column]
    if transposed:
        fan_in = cin * kernel
        flops = 2 * at * fan_in * c / op.groups
    else:
        fan_in = op.cin_per_group * kernel
        flops = 2 * at * fan_in * c
    reach = (n * int(ranges[0][column]), n * int(ranges[1][column]))
    cq = cin // (1 if transposed else op.groups)
    query = (nd, cq, c, kernel, stride, fan_in, transposed, backward)
    rate = _conv_rate_max(memo, rates, *query, reach)
    seconds = flops / rate
    if rates.gpu and rates.peak > 1.01 * rates.device.peak("fp32") and not rates.channels_last:
        # ``rates.gpu_conv_rate``: cuDNN's transposes to NHWC and back, at the stream peak
        scale = stride**nd  # the other operand's positions per position
        per = 2 * item * (cq * (1 if transposed else scale) + c * (scale if transposed else 1))
        most = per * reach[1]  # the stream rate grows with the size: at most the largest tile's
        seconds = seconds + per * at / _most(memo, rates, "copy", False, (most, most))
    return seconds


def _conv_rate_max(
    memo: dict, rates: Rates, nd: int, cin: int, cout: int, kernel: int, stride: int, fan_in: int,
    transposed: bool, backward: bool, reach: tuple[int, int],
) -> float:  # fmt: skip
    """The largest flops/s ``rates.conv`` gives this convolution at positions within ``reach``
    (least, most), any backend."""
    if rates.gpu:  # ``rates.gpu_conv_rate``: its quantization is at most 1
        tensor_cores = rates.peak > 1.01 * rates.device.peak("fp32")
        rate = rates.peak * GPU_CONV_EFFICIENCY * fan_in / (fan_in + (32 if tensor_cores else 8))
        winograd = nd == 2 and kernel == 9 and stride == 1 and not transposed
        if winograd and not tensor_cores and rates.dtype == torch.float32:
            rate *= WINOGRAD_3X3
        return rate * MARGIN
    if rates.ops is None or not rates._points(nd, transposed)[0]:
        return 0.5 * rates.peak * MARGIN
    value = "backward" if backward else "forward"
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
    """The grid values ``rates._table_rate`` weighs for a query ``q`` on one axis (sorted values)."""
    below = sum(v <= q for v in values)
    above = sum(v < q for v in values)
    lo = values[below - 1] if below else values[0]
    hi = values[above] if above < len(values) else values[-1]
    return [lo] if hi <= lo else [lo, hi]


def _most(memo: dict, rates: Rates, kind: str, backward: bool, reach: tuple) -> float:
    """The largest rate ``rates`` gives an op of ``kind`` ("pool": window elements/s, else a stream's
    bytes/s, a norm's plain or strided) at sizes within ``reach`` (least, most). A CPU's rates
    interpolate between their table's points (piecewise linear in log size, constant beyond): at
    most the largest point of the segments ``reach`` spans; a GPU's stream rate grows with the size."""
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
