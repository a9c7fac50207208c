"""The calibration's convolution tables, read: a convolution's rate from the measurements nearest it.

Two readers of ``calibrate.measure``'s convolution points (`rates.Rates.convs`):
- on a grid (one backend, kernel and stride class measured over input channels, output channels and
  positions): multilinear in the logs over the grid's corners around the query, geometric in the rate
  (``_grid_rate``, ``_table_rate``; ``_table_rates`` for many positions of one convolution);
- elsewhere: inverse-distance weighting of the 3 nearest points in log space (``_nearest``;
  ``_nearest_rates`` for many queries of one convolution, which differ in positions alone: the points
  that can be nearest any of them kept once (``_near_points``), numpy narrowing those per query that
  ``math.dist`` then orders).
Split from rates.py (which keeps the rates' object and the memory-bound ops), the same functions.
"""

from __future__ import annotations

import bisect
import itertools
import math

import numpy as np


def _nearest(points: list[tuple[float, ...]], values: list[float], at: tuple[float, ...]) -> float:
    """Inverse-distance weighting of the 3 nearest measurements, in log space."""
    logs = np.array([_logs(p) for p in points])
    return _nearest_rates(_near_points(logs, _logs(at), (values,)), [math.log(max(at[2], 1))])[0][0]


def _logs(point: tuple[float, ...]) -> list[float]:
    return [math.log(max(v, 1)) for v in point]


def _near_points(points: np.ndarray, head: list[float], values: tuple[list[float], ...]) -> tuple:
    """What ``_nearest_rates`` reads of the points' logs for queries that differ in positions alone
    (``head``: the logs of a query, its positions' left out; ``values``: the points' rates, a list
    per kind): the points that may be among a query's 3 nearest whatever its positions, and their
    squared distance along the other coordinates (``base``).

    Points of one positions value are the same distance apart along positions from any query, so
    a point whose ``base`` exceeds the third smallest of its group (by 1e-6 relative and 1e-9,
    far beyond rounding: a sum of 3 squares is within a few ulps of the exact one, ``math.dist`` within
    one) has 3 points strictly nearer than it from every query and is never weighed: left out."""
    base = ((points[:, [0, 1, 3]] - np.array([head[0], head[1], head[3]])) ** 2).sum(axis=1)
    keep = np.zeros(len(points), dtype=bool)
    for along in np.unique(points[:, 2]):
        group = points[:, 2] == along
        third = np.sort(base[group])[min(2, group.sum() - 1)]
        keep |= group & (base <= third * (1 + 1e-6) + 1e-9)
    index = np.flatnonzero(keep)
    kept = [[v[i] for i in index.tolist()] for v in values]
    return head, base[index], points[index, 2], points[index].tolist(), kept


def _nearest_rates(near: tuple, xs: list[float]) -> list[tuple[float, ...]]:
    """Per query (``xs``: the log of its positions), the inverse-distance weighting of its 3 nearest
    points' rates, one per list of ``near``'s values (``_near_points``), in log space.

    numpy keeps the points no farther than about a query's third nearest (squared distances within
    1e-6 of the third's, ties and rounding kept): a superset of those within its third nearest by
    ``math.dist``; the 3 smallest (distance, rate) pairs of any such superset are those of all the
    points, which ``math.dist`` then measures and sorts (a nearer distance first, then a smaller
    rate), weighed by 1 / distance**2 (the nearest alone within 1e-9). Most queries have 3 of them
    at distinct distances: one order and one set of weights then serve every kind of rate (those of
    3 candidates unrolled, the same operations in the same order)."""
    head, base, along, rows, values = near
    out, dist, last = [], math.dist, min(2, len(rows) - 1)
    for start in range(0, len(xs), 1024):  # (queries, points): a few MiB
        chunk = xs[start : start + 1024]
        far = base + (along - np.array(chunk)[:, None]) ** 2
        near = far <= np.partition(far, last, axis=1)[:, last : last + 1] * (1 + 1e-6) + 1e-9
        cols, ends = np.nonzero(near)[1].tolist(), np.cumsum(near.sum(axis=1)).tolist()
        at = [head[0], head[1], 0.0, head[3]]  # math.dist reads the query's logs: positions' set per query
        for x, a, b in zip(chunk, [0, *ends[:-1]], ends, strict=True):
            at[2] = x
            if b - a == 3:  # most queries: the same steps as below, unrolled
                i, j, k = cols[a:b]
                ds = sorted([(dist(at, rows[i]), i), (dist(at, rows[j]), j), (dist(at, rows[k]), k)])
                (d0, i), (d1, j), (d2, k) = ds
                if 1e-9 <= d0 < d1 < d2:
                    w0, w1, w2 = 1 / d0**2, 1 / d1**2, 1 / d2**2
                    total = sum([w0, w1, w2])
                    out.append(tuple([sum([w0 * v[i], w1 * v[j], w2 * v[k]]) / total for v in values]))
                    continue
            else:
                ds = sorted([(dist(at, rows[i]), i) for i in cols[a:b]])
            rates = []
            for kind in values:
                top = sorted([(d, kind[i]) for d, i in ds])[:3]
                if top[0][0] < 1e-9:
                    rates.append(top[0][1])
                    continue
                weights = [1 / d**2 for d, _ in top]
                rates.append(sum(w * v for w, (_, v) in zip(weights, top, strict=True)) / sum(weights))
            out.append(tuple(rates))
    return out


def _grid_rate(
    points: list[dict], value: str, cin: int, cout: int, positions: int, stride: int, kernel: int,
    backend: str | None,
) -> float | None:  # fmt: skip
    """A convolution's rate from the calibration grid: among the measurements with the same stride
    class (1 or more), the same backend if any were measured with it (torch switches between im2col
    and oneDNN kernels at input sizes where rates jump), and the nearest kernel volume, multilinear
    in log(input channels), log(output channels), log(positions) over the grid's corners around the
    query, geometric in the rate; corners the grid skipped are left out of the weights."""
    return _table_rate(*_grid_table(points, value, stride, kernel, backend), cin, cout, positions)


def _grid_table(points: list[dict], value: str, stride: int, kernel: int, backend: str | None):
    """The grid ``_grid_rate`` interpolates in: (cin, cout, positions) -> rate, and each axis's values."""
    points = [p for p in points if (p["stride"] > 1) == (stride > 1)] or points
    if backend is not None:
        points = [p for p in points if p.get("backend") == backend] or points
    near = min({p["kernel"] for p in points}, key=lambda k: (abs(math.log(k / kernel)), -k))
    points = [p for p in points if p["kernel"] == near]
    table = {(p["cin"], p["cout"], p["positions"]): p[value] for p in points}
    return table, [sorted({k[axis] for k in table}) for axis in range(3)]


def _table_rates(table: dict, axes: list, cin: int, cout: int, positions: list[int]) -> list[float | None]:
    """``_table_rate`` at each of ``positions`` (one convolution's rows), the same floats: the input
    and output channels' corners once, then numpy weighs every position's corners along positions at
    once, in ``_table_rate``'s order (per channels' corner, the lower then the upper one; the corners'
    weights multiplied left to right, ``math.prod``'s), each step one IEEE operation as in Python.
    ``math.log`` and ``math.exp`` stay Python's (numpy's may round otherwise), as does ``q / lo``: the
    positions and grid values, below 2**53, are exact in float64, so numpy's quotient is the correctly
    rounded one Python's integer division gives. Positions beyond, or rates that ``math.log`` refuses
    (negative, NaN), are ``_table_rate``'s one at a time."""
    heads = []  # per (cin, cout) corner: the product of its weights, its rates along positions
    (c0, c1), values = (_corners(v, q) for v, q in zip(axes[:2], (cin, cout), strict=True)), axes[2]
    for v0, w0 in c0:
        for v1, w1 in c1:
            heads.append((w0 * w1, [table.get((v0, v1, v2)) for v2 in values]))
    rates = [r for _, along in heads for r in along if r]
    exact = 0 <= min(positions, default=0) and max(positions, default=0) < 1 << 53 and values[-1] < 1 << 53
    if not exact or not all(r > 0 for r in rates):
        return [_table_rate(table, axes, cin, cout, q) for q in positions]
    q, grid = np.array(positions, dtype=np.float64), np.array(values, dtype=np.float64)
    lo = np.maximum(np.searchsorted(grid, q, side="right") - 1, 0)  # bisect_right - 1, bisect_left
    hi = np.minimum(np.searchsorted(grid, q, side="left"), len(values) - 1)
    between, w = hi > lo, np.zeros(len(q))  # between: hi is the next value
    if between.any():
        spans = np.array([math.log(b / a) for a, b in zip(values, values[1:])] or [1.0])
        logs = [math.log(r) for r in (q / grid[lo])[between].tolist()]
        w[between] = np.array(logs) / spans[lo[between]]
    total, weight = np.zeros(len(q)), np.zeros(len(q))
    with np.errstate(invalid="ignore", over="ignore"):
        for w01, along in heads:
            rated = np.array([bool(r) for r in along])
            logs = np.array([math.log(r) if r else 0.0 for r in along])
            for index, w2, present in ((lo, 1.0 - w, True), (hi, w, between)):
                wt = w01 * w2
                use = (wt > 0) & rated[index] & present
                total = np.where(use, total + wt * logs[index], total)
                weight = np.where(use, weight + wt, weight)
        mean = total / np.where(weight > 0, weight, 1.0)
    return [math.exp(m) if g > 0 else None for m, g in zip(mean.tolist(), weight.tolist(), strict=True)]


def _corners(values: list, q: int) -> tuple:
    """``_table_rate``'s corners of a query ``q`` on one axis (sorted values): (value, weight) pairs."""
    below, above = bisect.bisect_right(values, q), bisect.bisect_left(values, q)
    lo = values[below - 1] if below else values[0]
    hi = values[above] if above < len(values) else values[-1]
    w = math.log(q / lo) / math.log(hi / lo) if hi > lo else 0.0
    return ((lo, 1 - w), (hi, w)) if hi > lo else ((lo, 1.0),)


def _table_rate(table: dict, axes: list, cin: int, cout: int, positions: int) -> float | None:
    corners = []
    for values, q in zip(axes, (cin, cout, positions), strict=True):  # sorted: bisect them
        below, above = bisect.bisect_right(values, q), bisect.bisect_left(values, q)
        lo = values[below - 1] if below else values[0]
        hi = values[above] if above < len(values) else values[-1]
        w = math.log(q / lo) / math.log(hi / lo) if hi > lo else 0.0
        corners.append(((lo, 1 - w), (hi, w)) if hi > lo else ((lo, 1.0),))
    total = weight = 0.0
    for corner in itertools.product(*corners):
        w = math.prod(w for _, w in corner)
        rate = table.get(tuple(v for v, _ in corner))
        if rate and w > 0:
            total, weight = total + w * math.log(rate), weight + w
    return math.exp(total / weight) if weight > 0 else None
