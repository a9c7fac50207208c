"""A lower bound of a tile's predicted time, from a few of its grid's tiles: the planner skips the
full prediction (``predict.predict_splits``) of tiles this already shows slower than its best.

A prediction sums, over the grid's tiles and nodes, each step's seconds (``steps.steps_of``), and
adds the engine's per-node cost. Each step takes at least its work (flops, or bytes moved) at the
*fastest* rate its op can get:

    convolution    flops / the largest calibrated rate its query can reach (``conv_rate_max``):
                   the rate is a weighted mean of calibration points (``rates._table_rate`` over the
                   grid's corners around the query, ``rates._nearest_logs`` over the nearest three);
                   on a GPU's tensor cores, plus cuDNN's NCHW <-> NHWC transposes at the stream peak
    memory-bound   bytes / the largest rate of its kind's table (rates interpolate between points)
    view, padding  0

and a node's work over the grid is its work per position times the positions of its boxes over
all tiles, which is a product over dimensions of the sums of its box lengths along each (a tile's
box is a product of per-dimension intervals that depend on its index in that dimension only). Those
sums are exact: the interior's tiles repeat one period of boxes moved (``grid.dim_keys``), so the
rows near the borders and one period give every index's lengths, from the diagonal rows the
prediction reads too (``grid.diagonal_of``).

Padded copies, thread wake-ups and gradient accumulation are left out (they only add). A training
step's recompute skips the last tile (its lengths are those of the last diagonal row). None
where the product rule does not hold (a sink without work in some tile, an empty box) or for fused steps.
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import torch

from bigpicture.engine.plan import tile_of
from bigpicture.engine.rules.resample import ConvTranspose, Pad, Resample, Slice
from bigpicture.engine.rules.window import Conv, Pool
from bigpicture.engine.split import Split
from bigpicture.engine.tiles import Layout, layout, working_counts
from bigpicture.perf.grid import diagonal_of, dim_keys
from bigpicture.perf.predict import _setting
from bigpicture.perf.rates import GPU_CONV_EFFICIENCY, GPU_STREAM_EFFICIENCY, WINOGRAD_3X3, Rates, _grid_table
from bigpicture.perf.steps import _SAVE_NOTHING, _SAVE_OUTPUT, _VIEWS, _facts, _stream_kind
from bigpicture.perf.walk import grad_in, grads

SAMPLES = 5  # diagonal rows per dimension of the first, cheaper bound
MARGIN = 1 + 1e-9  # rates from logs and exponentials may round a hair above the largest point


def time_bound(
    splits: list[Split], input_shape, dtype: torch.dtype, tile, device, training: bool, shared: dict,
    target: float = math.inf,
) -> float | None:  # fmt: skip
    """A lower bound of ``predict.predict_splits(splits, input_shape, dtype, tile, device, training,
    shared=shared).time``, or None where none is known: from ``SAMPLES`` diagonal rows per dimension
    first (``_sampled_sums``: a few rows, a weaker bound), then, below ``target``, from the exact
    lengths (``_length_sums``; the rows are the prediction's own: ``grid.diagonal_of``)."""
    _, rates, _, shared = _setting(device, dtype, None, shared)
    lays = [layout(s, input_shape, tile_of(tile, k)) for k, s in enumerate(splits)]
    total = None
    if max(g for lay in lays for g in lay.grid) > SAMPLES:
        total = _passes(splits, lays, dtype, rates, training, target, SAMPLES)
    if total is None or total < target:
        total = _passes(splits, lays, dtype, rates, training, target, None)
    return total


def _passes(splits, lays, dtype, rates, training: bool, target: float, samples: int | None) -> float | None:
    """``pass_bound`` summed over the passes, stopped once it reaches ``target``."""
    total = 0.0
    for s, lay in zip(splits, lays, strict=True):
        seconds = pass_bound(s, lay, dtype, rates, training, samples)
        if seconds is None:
            return None
        total += seconds
        if total >= target:
            break
    return total


def pass_bound(
    split: Split, lay: Layout, dtype: torch.dtype, rates: Rates, training: bool, samples: int | None = None
) -> float | None:
    """A lower bound of the predicted time of one pass (``predict._predict_pass``) with layout ``lay``,
    from the exact box lengths, or from ``samples`` rows per dimension."""
    if getattr(rates, "fused", False) or any(working_counts(split, lay, k) != lay.grid for k in split.sinks):
        return None
    sums = _length_sums(split, lay) if samples is None else _sampled_sums(split, lay, samples)
    if sums is None:
        return None
    item = torch.empty((), dtype=dtype).element_size()
    grad = grads(split, diagonal_of(split, lay).row(0)[1], False)
    every = {n: math.prod(t for t, _, _, _ in dims) for n, dims in sums.items()}  # positions over the grid
    rest = {n: every[n] - math.prod(e for *_, e in dims) for n, dims in sums.items()}  # but the last tile
    fwd = fwd_rest = bwd = 0.0
    ops = 0
    for node in list(grad)[1:]:
        f, b, op_counts = _node_bound(split, node, every, sums, grad, item, rates)
        fwd, bwd, ops = fwd + f, bwd + (b if training and grad[node] else 0.0), ops + op_counts
        if training:
            fwd_rest += _node_bound(split, node, rest, sums, grad, item, rates)[0]
    tiles, nodes = math.prod(lay.grid), len(grad) - 1
    grad_node_s = rates.train_node_s / 2
    # training: the forward keeps the last tile's graph (its nodes with autograd), the recompute
    # runs every other tile
    phases = [(fwd, tiles * nodes * rates.node_s + tiles * ops * rates.host_op_s
               + nodes * (grad_node_s - rates.node_s) * training)]  # fmt: skip
    if training:
        phases += [
            (fwd_rest, (tiles - 1) * (nodes * grad_node_s + ops * rates.host_op_s)),
            (bwd, tiles * nodes * grad_node_s + tiles * ops * rates.host_op_s),
        ]  # fmt: skip
    if rates.gpu:  # the host runs ahead of the GPU: a phase takes the longer of the two
        return sum(max(device, host) for device, host in phases)
    return sum(device + host for device, host in phases)


def _length_sums(split: Split, lay: Layout) -> dict | None:
    """Per node, per dimension: (the sum of its box lengths over the grid's indices along that
    dimension, the shortest, the longest, the last one's), exact: the lengths of the rows near the
    borders and of one period of the interior (``grid.dim_keys``, as the prediction's classes
    are found); None if a box is empty (the product rule does not hold)."""
    rows, sums = diagonal_of(split, lay).row, {}
    nodes = list(rows(0)[1])
    for d in range(split.nd):
        seen: dict = {}

        def lengths(j, d=d, seen=seen) -> tuple:
            if j not in seen:
                need = rows(j)[1]
                seen[j] = tuple(need[n].hi[d] - need[n].lo[d] for n in nodes)
            return seen[j]

        per_index = dim_keys(split, lay, rows, d, lengths)
        distinct: dict = {}  # the interior's indices share their period's tuples
        for t in per_index:
            distinct[id(t)] = (t, distinct.get(id(t), (t, 0))[1] + 1)
        table = np.array([t for t, _ in distinct.values()], dtype=np.int64)  # (distinct, nodes)
        if (table <= 0).any():
            return None
        counts = np.array([c for _, c in distinct.values()], dtype=np.int64)
        total, shortest, longest = counts @ table, table.min(axis=0), table.max(axis=0)
        for k, node in enumerate(nodes):
            sums.setdefault(node, []).append(
                (int(total[k]), int(shortest[k]), int(longest[k]), per_index[-1][k])
            )
    return sums


def _sampled_sums(split: Split, lay: Layout, samples: int) -> dict | None:
    """``_length_sums`` from below, from ``samples`` diagonal rows per dimension: along a dimension, a
    node's interval moves monotonically with the tile index (every rule maps intervals
    monotonically), so a tile between two sampled ones has at least the length from the first one's
    end back to the second one's start:

        len(j) >= hi(a) - lo(b)   for a < j < b   (lo, hi nondecreasing in j)

    (a lower bound of the sum and of the shortest, an upper bound of the longest, the last one's);
    None if a sampled box is empty or the intervals do not move monotonically."""
    rows, sums = diagonal_of(split, lay).row, {}
    for d, g in enumerate(lay.grid):
        js = sorted({round(i * (g - 1) / max(samples - 1, 1)) for i in range(samples)})
        boxes = [rows(j)[1] for j in js]
        for node in boxes[0]:
            lo = [r[node].lo[d] for r in boxes]
            hi = [r[node].hi[d] for r in boxes]
            if any(h <= a for a, h in zip(lo, hi, strict=True)) or lo != sorted(lo) or hi != sorted(hi):
                return None
            lengths = [h - a for a, h in zip(lo, hi, strict=True)]
            total, shortest, longest = sum(lengths), min(lengths), max(lengths)
            for k in range(len(js) - 1):
                between = js[k + 1] - js[k] - 1
                if between:
                    least = max(1, hi[k] - lo[k + 1])
                    total += between * least
                    shortest, longest = min(shortest, least), max(longest, hi[k + 1] - lo[k])
            sums.setdefault(node, []).append((total, shortest, longest, lengths[-1]))
    return sums


def _node_bound(split: Split, node, count: dict, sums: dict, grad: dict, item: int, rates: Rates):
    """(forward seconds, backward seconds, ops per tile) of ``node`` over tiles where each node's
    boxes have ``count[node]`` positions in all, from below (``sums``: ``_length_sums``)."""
    op, (n, c) = split.ops[node], split.shapes[node][:2]
    name, _, _ = _facts(split, node)
    elems = n * c * count[node]
    if isinstance(op, (Conv, ConvTranspose)):
        return _conv_bound(split, op, node, count[node], sums, grad, rates)
    if name in _VIEWS or isinstance(op, (Slice, Pad)):
        return 0.0, 0.0, 0
    inputs = [math.prod(split.shapes[i][:2]) * count[i] for i in op.inputs if i in count]
    moved = (elems + sum(inputs)) * item
    if isinstance(op, Pool):
        window = elems * math.prod(op.kernel)
        fwd = max(window / _pool_max(rates, False), moved / _stream_max(rates, "unary", False))
        bwd = max(window / _pool_max(rates, True), 2 * moved / _stream_max(rates, "unary", False))
        return fwd, bwd, 1
    kind = _stream_kind(op, name)
    saves = name in _SAVE_OUTPUT or (name not in _SAVE_NOTHING and not isinstance(op, Resample))
    bwd = 3 * elems * item / _stream_max(rates, kind, True) if saves else 0.0
    return moved / _stream_max(rates, kind, False), bwd, 1


def _conv_bound(split: Split, op, node, count: int, sums: dict, grad: dict, rates: Rates):
    nd, n, c = split.nd, *split.shapes[node][:2]
    transposed, cin = isinstance(op, ConvTranspose), split.shapes[op.inputs[0]][1]
    if transposed:  # its work follows its input box, which is not a node's: left out
        return 0.0, 0.0, 1
    fan_in, lengths = op.cin_per_group * math.prod(op.kernel), sums[node]
    flops = 2 * n * count * fan_in * c
    sizes = (n * math.prod(m for _, m, _, _ in lengths), n * math.prod(m for _, _, m, _ in lengths))
    query = (nd, False, cin // op.groups, c, math.prod(op.kernel), max(op.step), fan_in)
    moved = _transposes_s(rates, n * count, cin // op.groups, c, max(op.step), nd)
    fwd = flops / _conv_rate_max(rates, *query, sizes, False) + moved
    times = 2 if grad_in(split, node, grad) else 1
    bwd = times * (flops / _conv_rate_max(rates, *query, sizes, True) + moved)
    return fwd, bwd, 1


def _transposes_s(rates: Rates, positions: int, cin: int, cout: int, stride: int, nd: int) -> float:
    """Seconds, at least, of cuDNN's NCHW <-> NHWC transposes on tensor cores that
    ``rates.gpu_conv_rate`` adds to a (not transposed) convolution's forward over ``positions``
    output positions (each kernel of its backward: the same per flop)."""
    if not rates.gpu or rates.channels_last or rates.peak <= 1.01 * rates.device.peak("fp32"):
        return 0.0
    item = torch.empty((), dtype=rates.dtype).element_size()
    moved = 2 * (cin * positions * stride**nd + cout * positions) * item
    return moved / _stream_max(rates, "copy", False)


def _conv_rate_max(rates: Rates, *query) -> float:
    """``conv_rate_max``, once per query and rates."""
    memo = rates.__dict__.setdefault("_bounds", {})
    if query not in memo:
        memo[query] = conv_rate_max(rates, *query)
    return memo[query]


def conv_rate_max(
    rates: Rates, nd: int, transposed: bool, cin: int, cout: int, kernel: int, stride: int, fan_in: int,
    sizes: tuple[int, int], backward: bool,
) -> float:  # fmt: skip
    """The largest flops/s ``rates.conv`` gives this convolution at output positions within ``sizes``
    (least, most), with any backend."""
    if rates.gpu:  # gpu_conv_rate's factors other than these are at most 1
        tensor_cores = rates.peak > 1.01 * rates.device.peak("fp32")
        rate = rates.peak * GPU_CONV_EFFICIENCY * fan_in / (fan_in + (32 if tensor_cores else 8))
        winograd = nd == 2 and kernel == 9 and stride == 1 and not transposed
        return rate * (WINOGRAD_3X3 if winograd and not tensor_cores and rates.dtype == torch.float32 else 1)
    if rates.ops is None:
        return 0.5 * rates.peak
    points, gridded = rates._points(nd, transposed)
    value = "backward" if backward else "forward"
    if not points:
        return 0.5 * rates.peak
    best, nearest = 0.0, not gridded
    memo = rates.__dict__.setdefault("_bounds", {})  # the tables this module reads, once per rates
    if ("backends", nd, transposed) not in memo:
        memo["backends", nd, transposed] = {p.get("backend") for p in points} | {None}
    for backend in memo["backends", nd, transposed] if gridded else ():
        key = ("grid", nd, transposed, value, stride > 1, backend, kernel)
        if key not in memo:
            memo[key] = _grid_table(points, value, stride, kernel, backend)
        table, axes = memo[key]
        ins, outs, grid = _weighted(axes[0], cin), _weighted(axes[1], cout), axes[2]
        # the positions corners of queries within sizes
        reach = grid[max(bisect.bisect_right(grid, sizes[0]) - 1, 0) : bisect.bisect_left(grid, sizes[1]) + 1]
        for size in reach:
            found = [r for r in (table.get((a, b, size)) for a in ins for b in outs) if r]
            nearest = nearest or not found  # a query next to this size may find no corner
            best = max(best, *found) if found else best
    if nearest:  # the nearest measurements answer: any that can be among the three nearest
        if ("logs", nd, transposed) not in memo:
            near = [[p["fan_in"], p["cout"], p["positions"], 4 ** (p["stride"] - 1)] for p in points]
            memo["logs", nd, transposed] = np.log(np.maximum(near, 1))
            memo["values", nd, transposed] = {
                v: np.array([p[v] for p in points]) for v in ("forward", "backward")
            }
        values = memo["values", nd, transposed][value]
        best = max(best, _nearest_max(memo["logs", nd, transposed], values, fan_in, cout, stride, sizes))
    return best * MARGIN


def _nearest_max(logs, values, fan_in: int, cout: int, stride: int, sizes, pieces: int = 16) -> float:
    """The largest value among the points ``rates._nearest_logs`` may weigh for a query whose
    positions lie within ``sizes``, a segment in log space cut in ``pieces``: on each piece, those no
    farther from it than the third point, chosen so, is from either of its ends (``logs``: the
    points' coordinates, ``values``: their rates)."""
    at = np.log(np.maximum([fan_in, cout, 1, 4 ** (min(stride, 2) - 1)], 1))
    across = ((logs[:, [0, 1, 3]] - at[[0, 1, 3]]) ** 2).sum(axis=1)
    cuts = np.linspace(*(math.log(max(v, 1)) for v in sizes), pieces + 1)
    x = logs[:, 2][None, :]
    x0, x1 = cuts[:-1, None], cuts[1:, None]  # (pieces, points)
    along = np.maximum(np.maximum(x0 - x, x - x1), 0)
    ends = across + np.maximum((x - x0) ** 2, (x - x1) ** 2)
    third = min(2, logs.shape[0] - 1)
    radius = np.partition(ends, third, axis=1)[:, third : third + 1]
    near = (across + along**2 <= radius * (1 + 1e-9) + 1e-12).any(axis=0)
    return float(values[near].max())


def _weighted(values: list, q) -> list:
    """The grid values ``rates._table_rate`` weighs (weight above 0) for a query ``q`` on one axis."""
    below, above = bisect.bisect_right(values, q), bisect.bisect_left(values, q)
    lo = values[below - 1] if below else values[0]
    hi = values[above] if above < len(values) else values[-1]
    if hi <= lo:
        return [lo]
    w = math.log(q / lo) / math.log(hi / lo)
    return [v for v, weight in ((lo, 1 - w), (hi, w)) if weight > 0]


def _stream_max(rates: Rates, kind: str, backward: bool) -> float:
    """The largest bytes/s ``rates.stream`` gives an op of ``kind`` (any size)."""
    if rates.gpu:
        return rates.device.bandwidth_bytes_per_s * GPU_STREAM_EFFICIENCY
    if rates.ops is None:
        return rates.device.bandwidth_bytes_per_s
    forward = rates.ops["stream"]
    table = (rates.ops.get("stream_backward", {}) if backward else forward).get(kind) or forward["unary"]
    return max(r for _, r in table) * MARGIN


def _pool_max(rates: Rates, backward: bool) -> float:
    if rates.gpu or rates.ops is None:
        return math.inf
    return max(r for _, r in rates.ops["pool"]["backward" if backward else "forward"]) * MARGIN
