"""``walk.peaks`` of many walks of one structure at once, on arrays of every step (``walk.row_peaks``).

``walk.peaks`` walks a tile's steps in Python, each step a few numpy operations on arrays with
one entry per walk (row): a few hundred steps of a network cost thousands of small operations per
walk of a pass, whatever its rows. Yet which values a walk adds to the bytes alive, and where, is
the same in every row of one structure (``walk.structures``); only the byte counts differ. So
here the walk is run once in Python on names only (``Program``: per step which byte counts come
and go), and the byte counts of every step and row are then summed at once:

    sources   per step, the byte counts the walk reads of it (its new value, workspace, padded
              copy, saved extras, its value's size), gathered for a chunk of rows in one take
    events    a byte count added or freed before a step (``at``): the bytes alive before each
              step are cumulative sums of the events' rows (``_before``)
    peaks     per step, the bytes alive plus what it holds while it runs; their maximum per row

Every number is an int64 sum of the same byte counts the walk adds, so the peaks are the walk's
bit for bit, in any order of summation (tests/test_row_walk.py compares them with the old walk).
A byte count zero in every row of a step is left out of the events (adding it changes nothing).
"""

from __future__ import annotations

import numpy as np

from bigpicture.engine.split import Split

OUT, TEMP, PAD, EXTRA, SIZE = range(5)  # the byte counts of a step, rows of ``Table.fields``
CHUNK = 2**20  # entries of a chunk's sources (rows x byte counts): a few MB at a time


class Table:
    """The byte counts the walks read, per step and per row of ``walk.row_peaks``'s arguments: each
    step's ``out``, ``temp``, ``padded``, ``saved_extra`` and its node's size on each of its step's
    rows (``sizes``), then as pseudo-steps the image's size and each sink's loss term per row."""

    def __init__(self, split: Split, steps: list, sizes: dict, terms: list, index: list, rows: int,
                 flags: np.ndarray) -> None:  # fmt: skip
        self.steps, self.index, self.rows = steps, index, rows
        lengths = [len(st.out) for st in steps]
        flat = [st.node for st in steps]
        extra = [sizes[split.input], *terms]  # per row: picked by the row itself
        self.offsets = np.cumsum([0] + lengths + [rows] * len(extra))[:-1]
        columns = [[st.out for st in steps], [st.temp for st in steps], [st.padded for st in steps],
                   [st.saved_extra for st in steps], [sizes[n] for n in flat]]  # fmt: skip
        zero = np.zeros(rows * len(extra), dtype=np.int64)
        extra = [np.broadcast_to(e, (rows,)) for e in extra]
        self.fields = np.stack([np.concatenate([*c, zero]) for c in columns[:SIZE]]
                               + [np.concatenate([*columns[SIZE], *extra])])  # fmt: skip
        self.width = self.fields.shape[1]
        self.flags = flags  # ``walk.flag_codes``: each step's structure on each of its entries
        starts = self.offsets[: len(steps)]
        self.nonzero = [np.logical_or.reduceat(self.fields[f, : len(self.flags)] != 0, starts)
                        if len(steps) else np.zeros(0, bool) for f in range(SIZE)]  # fmt: skip

    def codes(self, row: int) -> list[int]:
        """Per step, its flags on ``row`` (bits: aliases, keeps_padded, saves_inputs, saves_output)."""
        at = [int(p[row]) if not isinstance(p, slice) else row for p in self.index]
        return self.flags[self.offsets[: len(self.steps)] + np.array(at, dtype=np.int64)].tolist()

    def sources(self, chunk) -> np.ndarray:
        """The byte counts of the rows of ``chunk`` (rows, kinds x (steps + pseudo-steps) + 1): each
        row's on one line (the walks' sums run along it), the last always zero."""
        own = np.arange(self.rows)[chunk]
        parts = [own if isinstance(p, slice) else p[chunk] for p in self.index]
        parts += [own] * (len(self.offsets) - len(parts))
        picks = np.stack(parts, axis=1) + self.offsets
        count, stride = picks.shape
        out = np.zeros((count, (SIZE + 1) * stride + 1), dtype=np.int64)
        kinds = out[:, :-1].reshape(count, SIZE + 1, stride)  # a view
        for f in range(SIZE + 1):
            if f in (OUT, SIZE) or self.nonzero[f].any():  # the others: zero
                kinds[:, f] = self.fields[f].take(picks)
        return out


class Program:
    """The walks of ``walk.peaks`` on one structure, run on names: per walk the events (byte counts
    added or freed, the step from which on they count) and what each step holds while it runs.
    A byte count is a number: its kind (``OUT``...) times ``stride`` plus its (pseudo-)step; the
    events are lists of numbers (not of tuples: the garbage collector walks every new tuple's
    generation, and a pass has thousands)."""

    def __init__(self, split: Split, steps: list, codes: list, nonzero: list, grad: dict, training: bool,
                 input_copy: bool) -> None:  # fmt: skip
        x, n = split.input, len(steps)
        self.n, self.stride = n, n + 1 + len(split.sinks)
        pos = {st.node: t for t, st in enumerate(steps)}
        pos[x] = n  # the image's size: the first pseudo-step
        self.pos = pos
        size = SIZE * self.stride
        self.base = ([size + n] if input_copy else []) + [size + pos[k] for k in split.sinks if k in pos]
        self.terms = [size + n + 1 + k for k in range(len(split.sinks))]
        self.training = training
        walked = self._forward(split, steps, codes, nonzero, grad, training)
        self.inference, self.forward, owner, saved = walked
        if training:
            self.backward, self.transient = self._backward(split, steps, codes, nonzero, grad, owner, saved)

    def _forward(self, split: Split, steps: list, codes: list, nonzero: list, grad: dict, training: bool):
        """``walk._forward`` on names, without and with ``training`` at once (the same owners and
        references; the training's saved values are not freed): the frees, and the training's saved
        extras and padded copies kept, as events (at, source, negative); the owners and saved
        counts the training's leaves."""
        x, pos, stride = split.input, self.pos, self.stride
        size, pads, extras = SIZE * stride, nonzero[PAD].tolist(), nonzero[EXTRA].tolist()
        owner, refs, saved = {x: x}, {x: 1}, {}
        last = {}
        for st in steps:
            for i in st.inputs:
                last[i] = st.node
        held, at, src, neg, kept = set(split.sinks), [], [], [], ([], [], [])
        for t, (st, code) in enumerate(zip(steps, codes, strict=True)):
            node, inputs = st.node, st.inputs
            alias = code & 1 and inputs and inputs[0] in owner
            owner[node] = owner[inputs[0]] if alias else node
            refs[owner[node]] = refs.get(owner[node], 0) + 1
            if training and grad[node]:
                if code & 4:
                    if code & 2:
                        if pads[t]:  # the padded copy is what autograd keeps
                            kept[0].append(t + 1), kept[1].append(PAD * stride + t), kept[2].append(False)
                    else:
                        for i in inputs:
                            if i in owner:
                                saved[owner[i]] = saved.get(owner[i], 0) + 1
                if code & 8:
                    saved[owner[node]] = saved.get(owner[node], 0) + 1
                if extras[t]:
                    kept[0].append(t + 1), kept[1].append(EXTRA * stride + t), kept[2].append(False)
            for i in inputs:
                if last.get(i) is node and i not in held and i in owner:
                    o = owner[i]
                    refs[o] -= 1
                    if refs[o] == 0 and o is not x and o in pos:
                        at.append(t + 1), src.append(size + pos[o]), neg.append(True)
                        if o not in saved:
                            kept[0].append(t + 1), kept[1].append(size + pos[o]), kept[2].append(True)
        return (at, src, neg), kept, owner, saved

    def _backward(self, split: Split, steps: list, codes: list, nonzero: list, grad: dict, owner: dict,
                  saved: dict):  # fmt: skip
        """``walk._backward`` on names, over the steps with a gradient (b: their place in reverse
        order): the events of the bytes alive and of the gradient buffers, and per step what it
        holds only while it runs (its workspace and its inputs' new gradients)."""
        x, pos, stride = split.input, self.pos, self.stride
        size, temps = SIZE * stride, nonzero[TEMP].tolist()
        pads, extras = nonzero[PAD].tolist(), nonzero[EXTRA].tolist()
        buffers: set = set()
        at, src, neg, when, what, b = [], [], [], [], [], 0
        for t in reversed(range(len(steps))):
            st, code = steps[t], codes[t]
            node = st.node
            if not grad[node]:
                continue
            if node not in buffers:
                buffers.add(node)
                at.append(b), src.append(size + pos[node]), neg.append(False)
            if temps[t]:
                when.append(b), what.append(TEMP * stride + t)
            ins = [i for i in st.inputs if grad.get(i)]
            for i in ins:
                when.append(b), what.append(size + pos[i])
            for i in ins:
                if i not in buffers:
                    buffers.add(i)
                    at.append(b + 1), src.append(size + pos[i]), neg.append(False)
            buffers.discard(node)
            at.append(b + 1), src.append(size + pos[node]), neg.append(True)
            released = [owner[node]] if code & 8 else []
            if code & 4 and not code & 2:
                released += [owner[i] for i in st.inputs if i in owner]
            for o in set(released):
                saved[o] -= 1
                if saved[o] == 0 and o is not x:
                    at.append(b + 1), src.append(size + pos[o]), neg.append(True)
            if extras[t]:
                at.append(b + 1), src.append(EXTRA * stride + t), neg.append(True)
            if code & 4 and pads[t]:
                at.append(b + 1), src.append(PAD * stride + t), neg.append(True)
            b += 1
        self.steps_back = b
        return (at, src, neg), (when, what)

    def run(self, table: Table, chunk) -> tuple[np.ndarray, np.ndarray]:
        """(inference peaks, training peaks) of the rows of ``chunk``."""
        values = table.sources(chunk)
        n, stride = self.n, self.stride
        zero = values.shape[1] - 1

        def gather(sources: list) -> np.ndarray:  # the byte counts of sources on each row
            return values.take(sources, axis=1)

        live = np.cumsum(values[:, OUT * stride : OUT * stride + n], axis=1)  # made so far, its own included
        made = live[:, -1].copy() if n else 0
        for f in (TEMP, EXTRA):  # what a step holds while it runs
            if table.nonzero[f].any():
                live += values[:, f * stride : f * stride + n]
        base = gather(self.base).sum(axis=1)
        freed, _ = _before(gather, zero, *self.inference, n)
        peak = base + np.maximum((live + freed).max(axis=1, initial=0), 0)
        if not self.training:
            return peak, np.zeros_like(peak)
        kept, total = _before(gather, zero, *self.forward, n)
        fwd = base + np.maximum((live + kept).max(axis=1, initial=0), 0)
        end = base + made + total  # alive when the backward starts
        del live, kept, freed
        alive, _ = _before(gather, zero, *self.backward, self.steps_back)
        when, what = self.transient
        if when:
            when = np.array(when)
            starts = np.flatnonzero(np.r_[True, when[1:] != when[:-1]])
            alive[:, when[starts]] += np.add.reduceat(gather(what), starts, axis=1)
        bwd = end + np.maximum(alive.max(axis=1, initial=0), 0)
        if self.terms:
            bwd = bwd + np.maximum(gather(self.terms).max(axis=1), 0)
        return peak, np.maximum(fwd, bwd)


def _before(gather, zero: int, at: list, sources: list, negative: list, steps: int):
    """(per row and step, the sum of the events counted by the step (at <= step), per row the sum of
    every event)."""
    values = gather([zero] + sources)  # the zero first: counted by a step before any event
    if at:
        np.negative(values, out=values, where=np.array([False] + negative))
        np.cumsum(values, axis=1, out=values)
    counted = np.searchsorted(np.array(at, dtype=np.int64), np.arange(steps), side="right")
    return values.take(counted, axis=1), values[:, -1]
