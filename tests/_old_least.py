"""``least.holder`` and ``least._features`` as they were before ``_features`` read the block arrays
(commit f058fe2): the reference of tests/test_least_features.py, verbatim but for this docstring,
the imports and the ``_within`` it calls (unchanged, from ``least``)."""

from __future__ import annotations

import numpy as np

from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose, Pad
from bigpicture.engine.split import Split
from bigpicture.perf.grid import ClassGrid
from bigpicture.perf.least import _within
from bigpicture.perf.steps import _stored, geometries, padded_bounds, spatial_inputs


def holder(s: Split, cg: ClassGrid, copy: bool, cpu: bool = True) -> tuple[int, ...] | None:
    """A grid index whose kind bounds every kind in each dimension (the module's docstring), or None."""
    nodes = list(cg.diagonal.working_row(0)[1])
    ops = []  # the nodes whose steps read flags (their rule), or may alias a value the tile does not compute
    for n in nodes:
        if n in s.ops:
            op = s.ops[n]
            rule = ("native" if op.pads_natively(cpu) else "window") if isinstance(op, Window) else None
            rule = "pad" if isinstance(op, Pad) else rule
            first = op.inputs[0] if op.inputs else None
            aliasing = first is not s.input and first not in nodes
            if rule is not None or aliasing or isinstance(op, ConvTranspose):
                ops.append((n, op, rule, aliasing))
    features: dict = {}  # per diagonal row: its features along every dimension
    index = []
    for d, kinds in enumerate(cg.per_dim):
        for _, j in kinds:
            if j not in features:
                features[j] = _features(s, cg, j, copy, nodes, ops)
        along = [features[j][d] for _, j in kinds]
        order = sorted(range(len(kinds)), key=lambda i: -int(along[i][0].sum()))
        top = next((i for i in order if all(_within(f, along[i]) for f in along)), None)
        if top is None:
            return None
        index.append(kinds[top][1])
    return tuple(index)


def _features(s: Split, cg: ClassGrid, j: int, copy: bool, nodes: list, ops: list) -> list[tuple]:
    """What the walk of a class reads of its kind along each dimension, from the kind's diagonal row
    j: per dimension (lengths, flags, the geometry of the steps that may alias a value the tile does
    not compute). The lengths of a node's inputs are those of their own boxes, listed once; the
    flags are ``steps.geometries``' (what ``classes`` reads, for the nodes whose steps read them)."""
    writes, need = cg.diagonal.working_row(j)
    boxes = [need[n] for n in nodes] + list(writes)
    lengths = [np.maximum(np.array([b.hi for b in boxes]) - np.array([b.lo for b in boxes]), 0)]
    flags, fixed, nd = [], [], s.nd
    for n, op, rule, aliasing in ops:
        if need[n].empty:  # no step (its lengths say so too)
            flags.append((("empty", n),) * nd)
            continue
        g = geometries(s, n, need, _stored(s, spatial_inputs(s, n, need), need, copy))
        if rule == "pad":
            flags.append(tuple(("pad", outside) for _, outside, _, _ in g))
        elif rule is not None:
            if type(op).padded_box is not Window.padded_box:  # a plain window's grows with its box's
                lo, hi = padded_bounds(op, need[n])
                lengths.append(np.maximum(np.array(hi) - np.array(lo), 0)[None])
            flags.append(tuple((rule, outside, differ) for _, outside, differ, _ in g))
        if isinstance(op, ConvTranspose):
            lengths.append(np.array([[extra for *_, extra in g]]))
        if aliasing:
            fixed.append((n, g))
    table = np.concatenate(lengths).astype(np.int64)
    return [(table[:, d], tuple(f[d] for f in flags), tuple((n, g[d]) for n, g in fixed)) for d in range(nd)]
