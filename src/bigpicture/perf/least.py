"""The predicted peak memory of one tile, for the planner's error when no tile fits
(``search.least_prediction``): each pass's peak read off one tile of its grid where that tile
provably holds it, the others predicted (``predict._predict_pass``, counting bytes only).

A pass's peak is the largest of its classes' walks (``classes.aggregate``); a squeeze-and-excitation
network's 34-51 passes at a 64^3 tile on a 2,048^3 grid have up to 17^3 classes each, and predicting
them all took 6-37 s. But a class's walk is a function of its geometry per dimension (``classes``:
the boxes' lengths, whether a window reaches out of the image or reads a sub-box of its input), and
it grows with the lengths:

    kind j along d  <=  kind k along d   when every length of j (each node's box, its inputs',
                                         a window's padded input, a transposed convolution's input,
                                         each sink's write box) is at most k's, zero where k's is,
                                         and no window of k charges less of a padded copy (``_within``)

then swapping j for k in any class keeps the walk's *structure* (which values alias, which padded
copies autograd keeps: ``walk.structure``; which nodes have boxes) and grows each of its byte counts
(``steps_of``: products of the lengths, a workspace a non-negative multiple of one, a window's
padded copy where it reads one), so its peaks (sums of byte counts alive at once, ``walk.peaks``)
grow too. The flags per dimension (the window reaches out of the image, reads a sub-box of its
stored input) enter a step only as ``steps_of`` reads them, OR-ed over the dimensions:

    window padding natively   copies (temp) iff it reads a sub-box and reaches out of the image
                              nowhere: j reaches out here (never copies), or k does not and
                              reads a sub-box where j does
    other window              copies iff either; reaching out, autograd keeps the copy (structure):
                              k reaches out where j does, and reads sub-boxes where j does
    padding (``Pad``)         a view iff it reaches out nowhere (structure): the same in j and k
    every other op            the flags change its seconds only Where one kind per dimension bounds
every kind of that dimension, the tile of those kinds holds the pass's peak, and its walk alone is
the pass's memory, every part as predicted.

Not read off a tile (predicted as before): an inference on the CPU (its peak is also the boundary
pages resident in run order, ``resident.py``), grids that are not a product of kinds, and a step
that may alias a value the tile does not compute (its byte count is then taken off the tile's
memory when freed but was never added: larger is not more), unless its lengths are equal.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from bigpicture.engine.plan import tile_of
from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose, Pad
from bigpicture.engine.split import Split
from bigpicture.perf.grid import ClassGrid, class_grid, layout
from bigpicture.perf.memory_bound import walked_peaks
from bigpicture.perf.predict import _graph_memo, _memory, _predict_pass, _setting
from bigpicture.perf.prediction import Prediction
from bigpicture.perf.stage_cost import with_cuts
from bigpicture.perf.steps import _stored, geometries, padded_bounds, spatial_inputs
from bigpicture.perf.walk import TileWalk, tile_at


def memory_prediction(splits: list[Split], input_shape, dtype, tile, device, training: bool, shared: dict):
    """``predict_splits(splits, input_shape, dtype, tile, device, training, shared=shared)``'s memory,
    memory parts and tile (the planner's setting: the input not needing a gradient, on the device
    where it is the CPU). ``shared``: predictions with byte-counting rates (``bytes_only.bytes_only``), as
    ``search.least_prediction`` makes them: the time and work are not predicted. The tiles read off
    are walked together (``memory_bound.walked_peaks``: a node's steps once over every pass's)."""
    dev, rates, on_device, shared = _setting(device, dtype, None, shared)
    gpu, item = dev.name != "cpu", torch.empty((), dtype=dtype).element_size()
    lays = [layout(s, input_shape, tile_of(tile, k)) for k, s in enumerate(splits)]
    held = [_held(s, lay, training, gpu, rates, on_device) for s, lay in zip(splits, lays, strict=True)]
    read = [(k, cg, copy, index) for k, (cg, copy, index) in enumerate(held) if index is not None]
    walks = [(k, *tile_at(splits[k], lays[k], index), copy) for k, _, copy, index in read]
    passes = {}
    for (k, cg, *_), (peak, peak_train) in zip(read, walked_peaks(splits, walks, item, rates, training),
                                               strict=True):  # fmt: skip
        s = splits[k]
        parts = _memory(s, dtype, TileWalk(peak=peak, peak_train=peak_train), cg.tiles, training, gpu,
                        _graph_memo(s, shared))  # fmt: skip
        passes[k] = Prediction(device=dev.name, dtype=dtype, training=training, tile=lays[k].tile,
                               tiles=cg.tiles, classes=cg.classes, memory=sum(v for _, v in parts), time=0.0,
                               flops=0, halo_overhead=0.0, memory_parts=parts, stages=(), by_kind=(),
                               assumptions="")  # fmt: skip
    for k, s in enumerate(splits):
        if k not in passes:
            passes[k] = _predict_pass(s, input_shape, dtype, lays[k], dev, rates, training, False, on_device,
                                      shared.setdefault(id(s), {}), _graph_memo(s, shared))  # fmt: skip
    ordered = [passes[k] for k in range(len(splits))]
    peak = max(ordered, key=lambda p: p.memory)  # the first of equal peaks, as predict._combine
    whole = replace(ordered[0], memory=peak.memory, memory_parts=peak.memory_parts)
    return with_cuts(whole, splits, input_shape, tile, dtype, rates, training)  # as predict_splits does


def _held(s: Split, lay, training: bool, gpu: bool, rates, on_device: bool):
    """(the pass's class grid, whether its tiles copy their input, the grid index of the tile that
    holds its peak, or None where no tile is shown to: the module's docstring)."""
    if not (training or gpu) or getattr(rates, "fused", False):
        return None, None, None
    cg = class_grid(s, lay)
    if not cg.separable or not cg.diagonal.cover:
        return cg, None, None
    copy = not on_device or cg.tiles > 1  # as predict._predict_pass
    return cg, copy, holder(s, cg, copy, not gpu)


def holder(s: Split, cg: ClassGrid, copy: bool, cpu: bool) -> tuple[int, ...] | None:
    """A grid index whose kind bounds every kind in each dimension (the module's docstring), or None;
    ``cpu``: whether the device predicted is a CPU (``Window.pads_natively``)."""
    nodes = list(cg.diagonal.working_row(0)[1])
    computed = set(nodes)
    ops = []  # the nodes whose steps read flags (their rule), or may alias a value the tile does not compute
    for n in nodes:
        if n in s.ops:
            op = s.ops[n]
            rule = ("native" if op.pads_natively(cpu) else "window") if isinstance(op, Window) else None
            rule = "pad" if isinstance(op, Pad) else rule
            first = op.inputs[0] if op.inputs else None
            aliasing = first is not s.input and first not in computed
            if rule is not None or aliasing or isinstance(op, ConvTranspose):
                plain = rule in (None, "pad") or type(op).padded_box is Window.padded_box
                ops.append((n, op, rule, aliasing, plain))
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
    flags are ``steps.geometries``' (what ``classes`` reads, for the nodes whose steps read them).
    Read off the arrays of the row's block (``geometry.BlockGeometry``, the grid's own, the same
    values: tests/test_least_features.py), or ``_row_features`` where the row has none."""
    block, r = cg.geometry.block(j) if cg.geometry is not None else (None, 0)
    if block is None or not all(plain for *_, plain in ops):
        return _row_features(s, cg, j, copy, nodes, ops)
    boxes = block.block
    known = boxes.cache.get("least")
    if known is None or known[0] is not nodes:  # the nodes' boxes, then the write boxes
        known = boxes.cache["least"] = nodes, [boxes.place[n] for n in nodes] + list(range(boxes.sinks))
    rows = known[1]
    lengths = [np.maximum(boxes.hi[rows, :, r].astype(np.int64) - boxes.lo[rows, :, r], 0)]
    at = [block.at[n] for n, *_ in ops]
    outside, differ = block.outside[at, :, r].tolist(), block.differ[copy][at, :, r].tolist()
    extra = block.extra[at, :, r]
    flags, fixed, nd = [], [], s.nd
    for k, (n, op, rule, aliasing, _) in enumerate(ops):
        if rule == "pad":
            flags.append(tuple(("pad", outside[k][d]) for d in range(nd)))
        elif rule is not None:
            flags.append(tuple((rule, outside[k][d], differ[k][d]) for d in range(nd)))
        if isinstance(op, ConvTranspose):
            lengths.append(extra[k][None].astype(np.int64))
        if aliasing:
            fixed.append((n, block.node(r, copy, n)))
    table = np.concatenate(lengths).astype(np.int64)
    return [(table[:, d], tuple(f[d] for f in flags), tuple((n, g[d]) for n, g in fixed)) for d in range(nd)]


def _row_features(s: Split, cg: ClassGrid, j: int, copy: bool, nodes: list, ops: list) -> list[tuple]:
    """``_features`` from row j's boxes, one node at a time (``steps.geometries``)."""
    writes, need = cg.diagonal.working_row(j)
    boxes = [need[n] for n in nodes] + list(writes)
    lengths = [np.maximum(np.array([b.hi for b in boxes]) - np.array([b.lo for b in boxes]), 0)]
    flags, fixed, nd = [], [], s.nd
    for n, op, rule, aliasing, _ in ops:
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


def _within(small, large) -> bool:
    """Whether a kind's ``_features`` are bounded by another's: every length at most the other's
    (zero where it is zero), the flags as the module's docstring says, the same aliasing steps."""
    (a, fa, xa), (b, fb, xb) = small, large
    if len(a) != len(b) or len(fa) != len(fb) or xa != xb or not ((a <= b) & ((a == 0) == (b == 0))).all():
        return False
    return all(_flags_within(f, g) for f, g in zip(fa, fb, strict=True))


def _flags_within(small: tuple, large: tuple) -> bool:
    """One node's flags along a dimension (``_features``): the larger kind's step copies where the
    smaller's does and keeps the same structure (the module's docstring)."""
    if small[0] != large[0] or small[0] in ("empty", "pad"):  # the same node, or the same flag
        return small == large
    (kind, out_s, sub_s), (_, out_l, sub_l) = small, large
    if kind == "native":  # copies iff a sub-box is read and nothing reaches out: j reaching out never does
        return out_s or (not out_l and sub_s <= sub_l)
    return out_l == out_s and (sub_s <= sub_l)
