"""``rate_tables.py`` as it was before the nearest measurements were read per context and
``_table_rates`` weighed a position's corners once (the reference of ``test_rates_fast.py``): the
same functions, line for line."""

from __future__ import annotations

import bisect
import itertools
import math

import numpy as np


def _nearest(points: list[tuple[float, ...]], values: list[float], at: tuple[float, ...]) -> float:
    """Inverse-distance weighting of the 3 nearest measurements, in log space."""
    return _nearest_many(np.array([_logs(p) for p in points]), values, [at])[0]


def _logs(point: tuple[float, ...]) -> list[float]:
    return [math.log(max(v, 1)) for v in point]


def _nearest_many(points: np.ndarray, values: list[float], ats: list[tuple[float, ...]],
                  kept: dict | None = None) -> list[float]:  # fmt: skip
    """``_nearest`` at each of ``ats`` on the points' logs (the planner asks for many positions of one
    calibration): numpy finds each one's few nearest points, ``math.dist`` then orders them as
    ``_nearest`` does. ``kept``: per query, those points and their distances (``_closest``), kept
    between calls on the same points (the forward's and the backward's rates share them)."""
    kept = {} if kept is None else kept
    new = [at for at in dict.fromkeys(ats) if at not in kept]
    logs = [_logs(at) for at in new]
    rows = points.tolist()  # ``math.dist`` reads Python floats: the same numbers, no numpy scalars
    if len(points) <= 8:
        kept.update((at, _closest(lg, rows, range(len(points)))) for at, lg in zip(new, logs, strict=True))
    elif new:
        index = _candidates(points, np.array(logs))
        kept.update((at, _closest(lg, rows, i)) for at, lg, i in zip(new, logs, index, strict=True))
    return [_weighted(kept[at], values) for at in ats]


def _candidates(points: np.ndarray, queries: np.ndarray) -> list[list[int]]:
    """Per query (a row of logs), the indices of the points (in order) no farther than about its third
    nearest (squared distances within 1e-6 of the third's, ties and rounding kept): a superset of
    those ``_closest`` keeps, which it then measures by ``math.dist`` (its output is the same for any
    superset holding the three nearest). The planner's queries differ in their positions alone:
    the other coordinates' part of the distances is summed once."""
    out = []
    same = (queries[:, [0, 1, 3]] == queries[:1, [0, 1, 3]]).all()
    if same:  # (points,): the squared distance of every point but along positions
        base = ((points[:, [0, 1, 3]] - queries[0, [0, 1, 3]]) ** 2).sum(axis=1)
    for start in range(0, len(queries), 1024):  # (rows, points): a few MiB
        chunk = queries[start : start + 1024]
        if same:
            far = base + (points[:, 2] - chunk[:, 2:3]) ** 2
        else:
            far = ((points[None] - chunk[:, None]) ** 2).sum(axis=2)
        near = far <= np.partition(far, 2, axis=1)[:, 2:3] * (1 + 1e-6) + 1e-9  # ties and rounding kept
        cols, ends = np.nonzero(near)[1].tolist(), np.cumsum(near.sum(axis=1)).tolist()
        out += [cols[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    return out


def _closest(logs: list[float], points, index) -> list[tuple[float, int]]:
    """(distance, index) of the ``points`` at ``index`` (in order) that ``_weighted`` may weigh: those
    no farther than the third nearest (a calibration's grid has many points at one distance: the same
    fan-in, channels and positions measured for several backends and kernels)."""
    dist = [(math.dist(logs, points[i]), i) for i in index]
    third = sorted(d for d, _ in dist)[min(2, len(dist) - 1)]
    return [(d, i) for d, i in dist if d <= third]


def _weighted(close: list[tuple[float, int]], values: list[float]) -> float:
    """Inverse-distance weighting of the 3 points nearest a query, of its ``_closest`` (a nearer
    distance first, then a smaller value, as the (distance, value) pairs sort)."""
    dist = sorted([(d, values[i]) for d, i in close])[:3]  # ``heapq.nsmallest(3, ...)``, documented so
    if dist[0][0] < 1e-9:
        return dist[0][1]
    weights = [1 / d**2 for d, _ in dist]
    return sum(w * v for w, (_, v) in zip(weights, dist, strict=True)) / sum(weights)


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
    """``_table_rate`` at each of ``positions`` (one convolution's rows): the input and output channels'
    corners and the table's log-rates once, then per entry its positions' corners, weighed in the same
    order (the corners' weights multiplied left to right, ``math.prod``'s), the same floats."""
    heads = []  # per (cin, cout) corner: the product of its weights, its rates along positions, their logs
    (c0, c1), values = (_corners(v, q) for v, q in zip(axes[:2], (cin, cout), strict=True)), axes[2]
    for v0, w0 in c0:
        for v1, w1 in c1:
            heads.append((w0 * w1, {v2: table.get((v0, v1, v2)) for v2 in values}, {}))
    out = []
    for q in positions:
        total = weight = 0.0
        for w01, rates, logs in heads:
            for v2, w2 in _corners(values, q):
                w = w01 * w2
                if w > 0 and (rate := rates[v2]):
                    log = logs[v2] if v2 in logs else logs.setdefault(v2, math.log(rate))
                    total, weight = total + w * log, weight + w
        out.append(math.exp(total / weight) if weight > 0 else None)
    return out


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
