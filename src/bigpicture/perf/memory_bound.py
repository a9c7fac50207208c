"""The memory bounds of many candidate tiles at once: ``predict.least_memory`` of each.

``least_memory`` walks one tile per candidate (two where a dimension has two tiles), a step per
node built on its own. The planner asks it of every candidate down to the first that fits, so
here every candidate's walked tiles are rows of one walk on arrays:

    per node     one ``bytes_only.byte_steps`` over the rows (the walked tiles of every candidate):
                 ``steps.steps_of``'s byte counts and flags, no seconds
    per walk     ``walk.row_peaks``: rows of one structure walked together
    per tile     the largest of its rows' ``predict._memory`` sums, over its passes

with the same numbers as walking each tile on its own (``tests/test_plan_search.py``). A node's steps
are asked once over its rows in every pass walked (``tests/test_plan_passes.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bigpicture.engine.plan import tile_of
from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose, Pad
from bigpicture.engine.split import Split
from bigpicture.engine.tiles import layout, working_counts
from bigpicture.perf.bytes_only import byte_steps, bytes_only
from bigpicture.perf.predict import _graph_memo, _memory, _setting, memory_walked
from bigpicture.perf.resident import resident_bytes
from bigpicture.perf.row_memo import join_rows
from bigpicture.perf.steps import Rows, _stored, padded_bounds, spatial_inputs
from bigpicture.perf.walk import TileWalk, bytes_of, grads, row_peaks, tile_at


def least_memories(
    splits: list[Split], input_shape, dtype: torch.dtype, tiles, device, training: bool, shared: dict,
    passes=None,
) -> dict:  # fmt: skip
    """``predict.least_memory(splits, input_shape, dtype, tile, device, training, shared=shared)``
    of every tile in ``tiles`` (the input neither on the device nor needing a gradient: the planner's).

    ``passes``: the indices of the passes walked (default: every pass), the bound then the largest
    of theirs. The search walks the last pass (the whole network) first, and the others only for a
    tile it may predict (a squeeze-and-excitation network's 17-51 passes, for every candidate)."""
    dev, rates, on_device, shared = _setting(device, dtype, None, shared)
    item, counting = torch.empty((), dtype=dtype).element_size(), bytes_only(rates)
    least = dict.fromkeys(tiles, 0)
    ks = range(len(splits)) if passes is None else passes
    walks = [w for k in ks for w in _walks(splits[k], k, input_shape, tiles, on_device, item)]
    for (k, _, group), (peak, peak_train) in zip(walks, _peaks(splits, walks, item, counting, training),
                                                 strict=True):  # fmt: skip
        memo = _graph_memo(splits[k], shared)  # the model's sizes, once per graph
        for (tile, count, *_, resident), p, pt in zip(group, peak.tolist(), peak_train.tolist(),
                                                      strict=True):  # fmt: skip
            one = TileWalk(peak=p, peak_train=pt, run_peak=(p, resident))
            parts = _memory(splits[k], dtype, one, count, training, dev.name != "cpu", memo)
            least[tile] = max(least[tile], sum(v for _, v in parts))
    return least


def walked_peaks(splits: list[Split], walks: list, item: int, rates, training: bool) -> list[tuple[int, int]]:
    """(inference peak, training peak) of the tile of each of ``walks`` ((pass, node boxes, write
    boxes, whether it copies its input)), as ``walk.walk`` gives them: walked together, a node's
    steps asked once over its rows in every pass (``_peaks``). ``rates``: byte-counting ones."""
    groups: dict = {}
    for i, (k, need, writes, copy) in enumerate(walks):
        key = (k, copy, tuple((n, b.empty) for n, b in need.items()))
        groups.setdefault(key, []).append((i, None, need, writes, None))
    grouped = [(k, copy, group) for (k, copy, _), group in groups.items()]
    out: list = [None] * len(walks)
    for (*_, group), (peak, peak_train) in zip(grouped, _peaks(splits, grouped, item, rates, training),
                                               strict=True):  # fmt: skip
        for (i, *_), p, pt in zip(group, peak.tolist(), peak_train.tolist(), strict=True):
            out[i] = (p, pt)
    return out


def _walks(s: Split, k: int, input_shape, tiles, on_device: bool, item: int) -> list:
    """The tiles pass ``k`` walks for the memory bounds of ``tiles``, grouped by the nodes they
    compute (non-empty boxes) and the input's copy: [(k, copy, [(tile, count, need, writes,
    resident)])]."""
    groups: dict = {}
    for tile in tiles:
        lay = layout(s, input_shape, tile_of(tile, k))
        working = max((working_counts(s, lay, sink) for sink in s.sinks), key=math.prod)
        count = math.prod(working)
        copy = not on_device or count > 1
        for index in memory_walked(lay, working):
            need, writes = tile_at(s, lay, index)
            key = (copy, tuple((n, b.empty) for n, b in need.items()))
            resident = resident_bytes(s, lay, index, item)  # the tile's class peaks no earlier
            groups.setdefault(key, []).append((tile, count, need, writes, resident))
    return [(k, copy, group) for (copy, _), group in groups.items()]


def _peaks(splits: list[Split], walks: list, item: int, rates, training: bool) -> list:
    """(inference peaks, training peaks) of each group of ``walks`` ((pass, copy, [(tile, count,
    need, writes, resident)])). A node's steps are asked once over its rows in every group of every
    pass (a squeeze-and-excitation network's 17-34 passes share most nodes)."""
    prepared, calls = [], {}
    for w, (k, copy, group) in enumerate(walks):
        s, needs = splits[k], [need for _, _, need, *_ in group]
        grad = grads(s, needs[0], False)  # the same nodes in every walk of the group
        numel = _numels(needs)
        prepared.append((grad, numel))
        for node in list(grad)[1:]:
            rows = _rows(s, node, needs, copy, numel)
            calls.setdefault((node, id(s.ops[node]), tuple(i for i, _ in rows.inputs)), []).append((w, rows))
    steps: list[dict] = [{} for _ in walks]  # per group, node -> (its steps over every group, sizes, rows)
    for (node, *_), parts in calls.items():  # a step's bytes: of its rows alone (``bytes_only.byte_steps``)
        s = splits[walks[parts[0][0]][0]]
        rows = join_rows([r for _, r in parts])
        st, start = byte_steps(s, node, rows, item, rates), 0
        size = bytes_of(s, node, rows.numel, item)
        for w, r in parts:
            steps[w][node], start = (st, size, np.arange(start, start + len(r.numel))), start + len(r.numel)
    out = []
    for w, (k, copy, group) in enumerate(walks):
        s, (grad, numel) = splits[k], prepared[w]
        ours = [steps[w][n] for n in list(grad)[1:]]
        sizes = {s.input: bytes_of(s, s.input, numel[s.input], item), **{st.node: z for st, z, _ in ours}}
        terms = [
            bytes_of(s, sink, np.array([writes[i].numel for *_, writes, _ in group], dtype=np.int64), item)
            for i, sink in enumerate(s.sinks)
        ]
        index = [i for *_, i in ours]
        out.append(row_peaks(s, [st for st, *_ in ours], sizes, terms, grad, training, copy, index))
    return out


def _numels(needs: list[dict]) -> dict:
    """Per node, the positions of its box in each walk (int64): each box counted once, not once
    per reader (as a node, as each user's input, for its bytes)."""
    first = needs[0]
    if len(needs) == 1:
        out = {n: np.array([b.numel], dtype=np.int64) for n, b in first.items()}
    else:
        out = {n: np.array([need[n].numel for need in needs], dtype=np.int64) for n in first}
    for a in out.values():
        a.flags.writeable = False  # shared by the node's rows, its users' and its bytes
    return out


def _rows(split: Split, node, needs: list[dict], copy: bool, numel: dict) -> Rows:
    """The geometries of ``node``'s step in each walk, as ``steps.node_step`` makes them one at a
    time; ``numel``: the boxes' positions (``_numels``). A window's (or padding's) padded box is
    made once per walk (``_padding``), not by ``steps.geometries`` and ``op.padded_box`` apart."""
    op, nd, r = split.ops[node], split.nd, len(needs)
    inputs = tuple((i, numel[i]) for i in op.inputs if i in needs[0])
    extra = np.ones((r, nd), dtype=np.int64)  # a transposed convolution's input box, 1 for the others
    if isinstance(op, ConvTranspose):
        extra = np.array([op.needs(need[node])[0].shape for need in needs], dtype=np.int64)
    if not isinstance(op, (Window, Pad)):  # only they read out of the image or a sub-box
        return Rows(numel[node], inputs, np.ones((r, nd), dtype=np.int64), extra, np.zeros(r, dtype=bool),
                    np.zeros(r, dtype=bool))  # fmt: skip
    copied, outside, padded = zip(*(_padding(split, node, op, need, copy) for need in needs), strict=True)
    return Rows(
        numel[node],
        inputs,
        np.array(padded, dtype=np.int64) if isinstance(op, Window) else np.ones((r, nd), dtype=np.int64),
        extra,
        np.array([c and o for c, o in zip(copied, outside, strict=True)]),
        np.array(copied),
    )


def _padding(split: Split, node, op, need: dict, copy: bool) -> tuple[bool, bool, tuple]:
    """(whether the step copies its input: ``steps.step_key``'s outside or strided flag, whether its
    padded box reaches out of the image (``steps._outside``), the padded box's shape) of a window's
    or a padding's step on one walk: ``steps.geometries``' flags, from one ``padded_bounds``."""
    lo, hi = padded_bounds(op, need[node])
    outside = any([a < 0 or b > n for a, b, n in zip(lo, hi, op.in_extents[0], strict=True)])
    copied = outside
    if not outside and isinstance(op, Window):  # a sub-box of the value its input is stored as
        stored = _stored(split, spatial_inputs(split, node, need), need, copy)
        copied = any([a != c or b != e for a, b, c, e in zip(lo, hi, stored.lo, stored.hi, strict=True)])
    return copied, outside, tuple([b - a if b > a else 0 for a, b in zip(lo, hi)])
