"""``rate_tables._nearest_rates`` as it was before its queries of three candidates were weighed
unrolled (the reference of ``test_backends_fast.py``): the same function, line for line."""

from __future__ import annotations

import math

import numpy as np


def _nearest_rates(near: tuple, xs: list[float]) -> list[tuple[float, ...]]:
    """Per query (``xs``: the log of its positions), the inverse-distance weighting of its 3 nearest
    points' rates, one per list of ``near``'s values (``_near_points``), in log space.

    numpy keeps the points no farther than about a query's third nearest (squared distances within
    1e-6 of the third's, ties and rounding kept): a superset of those within its third nearest by
    ``math.dist``; the 3 smallest (distance, rate) pairs of any such superset are those of all the
    points, which ``math.dist`` then measures and sorts (a nearer distance first, then a smaller
    rate), weighed by 1 / distance**2 (the nearest alone within 1e-9). Most queries have 3 of them
    at distinct distances: one order and one set of weights then serve every kind of rate."""
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
            ds = sorted([(dist(at, rows[i]), i) for i in cols[a:b]])
            if len(ds) == 3 and 1e-9 <= ds[0][0] < ds[1][0] < ds[2][0]:  # no ties: every kind's order
                weights = [1 / d**2 for d, _ in ds]
                total = sum(weights)
                out.append(tuple(sum([w * v[i] for w, (_, i) in zip(weights, ds)]) / total for v in values))
                continue
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
