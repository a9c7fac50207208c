"""``walk.row_peaks`` and the walk it runs (``peaks``, ``_forward``, ``_backward``, ``structures``)
as they were at 0effb00, before the rows were walked on arrays of every step at once: the reference
of tests/test_row_walk.py, verbatim but for this docstring and the imports."""

from __future__ import annotations

from functools import reduce

import numpy as np

from bigpicture.engine.split import Split
from bigpicture.perf.steps import _FLAGS, Step


def peaks(split: Split, steps: list, sizes: dict, terms: list, grad: dict, training: bool, input_copy: bool):
    """(inference peak, training peak) of a tile's steps; ``terms``: bytes of each sink's write box
    (the tile's loss terms, each times its gradient)."""
    x = split.input
    crop = sizes[x] if input_copy else 0
    hold = sum(sizes.get(k, 0) for k in split.sinks)  # the previous tile's sinks: alive until this returns
    peak, _ = _forward(split, steps, sizes, crop + hold, training=False)
    if not training:
        return peak, 0
    fwd_peak, state = _forward(split, steps, sizes, crop + hold, training=True, grad=grad)
    bwd_peak = _backward(steps, sizes, state, grad) + reduce(np.maximum, terms, 0)
    return peak, np.maximum(fwd_peak, bwd_peak)


_FIELDS = ("out", "temp", "padded", "saved_extra")  # the byte counts a walk reads of a step
CHUNK_ROWS = 4096  # rows walked together by ``row_peaks``


def row_peaks(
    split: Split,
    steps: list,
    sizes: dict,
    terms: list,
    grad: dict,
    training: bool,
    input_copy: bool,
    index: list | None = None,
):
    """``peaks`` of many walks at once, one per row: ``steps`` on arrays (``steps.steps_of``) with
    one entry per walk, as are ``sizes`` (per node) and ``terms`` (per sink). Rows whose steps have
    the same *structure* (which values alias, which padded copies autograd keeps) run the same
    walk with other byte counts, so each structure is walked once on numpy arrays; (inference
    peaks, training peaks) per row. ``index``: per step, the entry of each row (the steps then hold
    each distinct step once: a grid's classes share them, and 32,768 classes of 400 nodes picked
    out whole would take a gigabyte)."""
    rows = len(sizes[split.input])
    index = index or [slice(None)] * len(steps)
    which = structures(steps, index, rows)
    peak, peak_train = np.zeros(rows, dtype=np.int64), np.zeros(rows, dtype=np.int64)
    groups = [np.flatnonzero(which == g) for g in range(int(which.max()) + 1 if rows else 0)]
    for chunk in (c for g in groups for c in np.array_split(g, -(-len(g) // CHUNK_ROWS))):
        group = []  # a chunk of rows of one structure: arrays of a few thousand rows, whatever the grid
        for st, pick in zip(steps, index, strict=True):  # the walk reads the byte counts and flags only
            at = chunk if isinstance(pick, slice) else pick[chunk]
            flags = {f: bool(getattr(st, f)[at[0]]) for f in _FLAGS}
            group.append(Step(st.node, st.inputs, **{f: getattr(st, f)[at] for f in _FIELDS}, **flags))
        p, pt = peaks(split, group, {n: v[chunk] for n, v in sizes.items()}, [t[chunk] for t in terms], grad,
                      training, input_copy)  # fmt: skip
        peak[chunk], peak_train[chunk] = p, pt
    return peak, peak_train


def structures(steps: list, index: list, rows: int) -> np.ndarray:
    """Per row, the number of its steps' structures (``structure``) among the rows', in their
    lexicographic order (as renumbering after each step with ``np.unique`` would number them):
    steps alike in every row change no order and are skipped, the others packed 4 bits each
    until int64 would overflow."""
    which, top, packed = np.zeros(rows, dtype=np.int64), 1, False  # top: above every entry of which
    for st, pick in zip(steps, index, strict=True):
        code = structure(st)
        if len(code) == 0 or (code == code[0]).all():
            continue
        if top * 16 > 2**62:
            _, which = np.unique(which, return_inverse=True)
            which, top = which.reshape(-1), int(which.max(initial=0)) + 1
        which, top, packed = which * 16 + code[pick], top * 16, True
    if packed:
        which = np.unique(which, return_inverse=True)[1].reshape(-1)
    return which


def structure(st) -> np.ndarray:
    """What decides a step's part in the walk, besides its byte counts (per row of a step on arrays)."""
    return st.aliases + 2 * st.keeps_padded + 4 * st.saves_inputs + 8 * st.saves_output


def _forward(split: Split, steps: list, sizes: dict, base, training: bool, grad: dict | None = None):
    """Peak bytes of one forward over the tile; with ``training``, what stays saved at its end."""
    owner, refs, saved = {split.input: split.input}, {split.input: 1}, {}
    last = {}
    for st in steps:
        for i in st.inputs:
            last[i] = st.node
    live = peak = base
    held = set(split.sinks)
    for st in steps:
        node = st.node
        alias = st.aliases and st.inputs and st.inputs[0] in owner
        owner[node] = owner[st.inputs[0]] if alias else node
        refs[owner[node]] = refs.get(owner[node], 0) + 1
        peak = np.maximum(peak, live + st.out + st.temp + st.saved_extra)
        live = live + st.out
        if training and grad[node]:
            if st.saves_inputs:
                if st.keeps_padded:
                    live = live + st.padded  # the padded copy is what autograd keeps
                else:
                    for i in st.inputs:
                        if i in owner:  # an input whose box is empty (only padding read) is not computed
                            saved[owner[i]] = saved.get(owner[i], 0) + 1
            if st.saves_output:
                saved[owner[node]] = saved.get(owner[node], 0) + 1
            live = live + st.saved_extra
        for i in st.inputs:
            if last.get(i) is node and i not in held and i in owner:
                o = owner[i]
                refs[o] -= 1
                if refs[o] == 0 and o not in saved and o is not split.input:
                    live = live - sizes.get(o, 0)
    return peak, (live, owner, saved, split.input)


def _backward(steps: list, sizes: dict, state, grad: dict):
    """Peak bytes of the backward of one tile, from the end of its recompute."""
    live, owner, saved, x = state
    peak = live
    buffers: dict = {}
    for st in reversed(steps):
        node = st.node
        if not grad[node]:
            continue
        buffers.setdefault(node, sizes[node])
        new = sum(sizes[i] for i in st.inputs if grad.get(i))
        peak = np.maximum(peak, live + sum(buffers.values()) + new + st.temp)
        for i in st.inputs:
            if grad.get(i):
                buffers[i] = sizes[i]
        buffers.pop(node)
        released = [owner[node]] if st.saves_output else []
        if st.saves_inputs and not st.keeps_padded:
            released += [owner[i] for i in st.inputs if i in owner]
        for o in set(released):
            saved[o] -= 1
            if saved[o] == 0 and o is not x:
                live = live - sizes[o]
        live = live - (st.saved_extra + (st.padded if st.saves_inputs else 0))
    return peak
