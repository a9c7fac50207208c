"""The walk over one tile's steps: its peak memory and its time, as the tile interpreter runs it.

    steps in ``split.order`` (``execute.Runner.run_tile``): values freed at their last use, sinks
    kept (the tile returns views of them); training: the recompute with grad (saved values stay)
    and the backward in reverse order (gradient buffers live from their first user to their node)

The memory functions take byte counts that are numbers or numpy arrays alike: ``classes.py``
walks every class of tiles of one structure at once, with one array entry per class.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from functools import partial, reduce

import numpy as np
import torch

from bigpicture.engine.regions import needs
from bigpicture.engine.split import Split
from bigpicture.engine.tiles import Layout, Tiles, write_box
from bigpicture.perf.rates import Rates
from bigpicture.perf.row_walk import CHUNK, Program, Table
from bigpicture.perf.steps import Step, _facts, node_step


@dataclass
class TileWalk:
    """Peak bytes (inference, training) and seconds of one tile, or summed over tiles (the peaks
    then the largest tile's), with nothing of the tile allocated."""

    peak: int = 0
    peak_train: int = 0
    # (working set, bytes of the boundary tensors resident) of the tile where an inference on the CPU
    # peaks in run order (``resident.py``); None: the largest working set with the whole boundary
    run_peak: tuple[int, int] | None = None
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    flops_fwd: int = 0
    flops_bwd: int = 0
    nodes: int = 0
    ops: int = 0
    fwd_by_kind: dict = field(default_factory=dict)
    bwd_by_kind: dict = field(default_factory=dict)
    # of a grid's sum (``classes.aggregate``): the grid's last tile with work, its steps read off its class
    last: TileWalk | None = field(default=None, repr=False, compare=False)

    def add_step(self, st: Step, count: int, grad: bool) -> None:
        """``count`` tiles run step ``st`` (and its backward, with ``grad``)."""
        self.nodes += count
        self.ops += count * (st.kind != "view")
        self.fwd_s += count * st.fwd_s
        self.flops_fwd += count * st.flops
        self.fwd_by_kind[st.kind] = self.fwd_by_kind.get(st.kind, 0.0) + count * st.fwd_s
        if grad:
            self.bwd_s += count * st.bwd_s
            self.flops_bwd += count * st.flops_bwd
            self.bwd_by_kind[st.kind] = self.bwd_by_kind.get(st.kind, 0.0) + count * st.bwd_s

    def add_row(self, st: Step, i: int, grad: bool) -> None:
        """``add_step`` of row i of a step on arrays (``steps.row``) run by one tile, without the row's
        other fields: the same sums."""
        kind, fwd_s = str(st.kind[i]), float(st.fwd_s[i])
        self.nodes += 1
        self.ops += kind != "view"
        self.fwd_s += fwd_s
        self.flops_fwd += int(st.flops[i])
        self.fwd_by_kind[kind] = self.fwd_by_kind.get(kind, 0.0) + fwd_s
        if grad:
            bwd_s = float(st.bwd_s[i])
            self.bwd_s += bwd_s
            self.flops_bwd += int(st.flops_bwd[i])
            self.bwd_by_kind[kind] = self.bwd_by_kind.get(kind, 0.0) + bwd_s

    def add_steps(self, st: Step, tiles: np.ndarray, grad: bool) -> None:
        """Steps on arrays (``steps.steps_of``): row i run by ``tiles[i]`` tiles."""
        counts = tiles.tolist()
        total = sum(counts)
        self.nodes += total
        kinds = st.kind.tolist()
        if kinds and kinds.count(kinds[0]) == len(kinds):  # one kind: the sums over all rows are its
            self._add_kind(st, tiles, counts, total, kinds[0], grad)
            return
        kinds = list(dict.fromkeys(kinds))
        self.ops += int(tiles[st.kind != "view"].sum())
        self.fwd_s += float(tiles @ st.fwd_s)
        self.flops_fwd += sum(map(operator.mul, counts, st.flops.tolist()))
        kinds = [(k, st.kind == k) for k in kinds]
        for kind, rows in kinds:
            self.fwd_by_kind[kind] = self.fwd_by_kind.get(kind, 0.0) + float(tiles[rows] @ st.fwd_s[rows])
        if grad:
            self.bwd_s += float(tiles @ st.bwd_s)
            self.flops_bwd += sum(map(operator.mul, counts, st.flops_bwd.tolist()))
            for kind, rows in kinds:
                self.bwd_by_kind[kind] = self.bwd_by_kind.get(kind, 0.0) + float(tiles[rows] @ st.bwd_s[rows])

    def _add_kind(self, st: Step, tiles: np.ndarray, counts: list, total: int, kind: str, grad: bool) -> None:
        """``add_steps`` of steps whose rows are all of one kind (``counts``: ``tiles`` as a list,
        ``total`` their sum)."""
        self.ops += total if kind != "view" else 0
        fwd_s = float(tiles @ st.fwd_s)
        self.fwd_s += fwd_s
        self.flops_fwd += sum(map(operator.mul, counts, st.flops.tolist()))
        self.fwd_by_kind[kind] = self.fwd_by_kind.get(kind, 0.0) + fwd_s
        if grad:
            bwd_s = float(tiles @ st.bwd_s)
            self.bwd_s += bwd_s
            self.flops_bwd += sum(map(operator.mul, counts, st.flops_bwd.tolist()))
            self.bwd_by_kind[kind] = self.bwd_by_kind.get(kind, 0.0) + bwd_s

    def add_accumulation(self, seconds: float) -> None:
        self.bwd_s += seconds
        self.bwd_by_kind["binary"] = self.bwd_by_kind.get("binary", 0.0) + seconds

    def add(self, other: TileWalk, count: int) -> None:
        """``count`` tiles like ``other``: times and work add up, peaks take the larger."""
        self.peak, self.peak_train = max(self.peak, other.peak), max(self.peak_train, other.peak_train)
        for name in ("fwd_s", "bwd_s", "flops_fwd", "flops_bwd", "nodes", "ops"):
            setattr(self, name, getattr(self, name) + count * getattr(other, name))
        for mine, theirs in ((self.fwd_by_kind, other.fwd_by_kind), (self.bwd_by_kind, other.bwd_by_kind)):
            for kind, s in theirs.items():
                mine[kind] = mine.get(kind, 0.0) + count * s


def walk(
    split: Split,
    need: dict,
    writes: tuple,
    dtype: torch.dtype,
    rates: Rates,
    training: bool,
    input_grad: bool = False,
    input_copy: bool = True,
    memo: dict | None = None,
) -> TileWalk:
    """Walk one tile whose nodes compute the boxes ``need`` and whose sinks write ``writes``.

    ``memo`` keeps steps between walks of one split, rates and dtype: tiles share most node boxes.
    """
    item = torch.empty((), dtype=dtype).element_size()
    memo = {} if memo is None else memo
    grad = grads(split, need, input_grad)  # the image first: it has no step
    nodes = list(grad)[1:]
    steps = [node_step(split, n, need, grad_in(split, n, grad), input_copy, item, rates, memo) for n in nodes]
    sizes = {n: bytes_of(split, n, need[n].numel, item) for n in grad}
    result = TileWalk()
    for st in steps:
        result.add_step(st, 1, training and grad[st.node])
    terms = [bytes_of(split, k, w.numel, item) for k, w in zip(split.sinks, writes, strict=False)]
    peak, peak_train = peaks(split, steps, sizes, terms, grad, training, input_copy)
    result.peak, result.peak_train = int(peak), int(peak_train)
    if training:
        result.add_accumulation(sum(accumulation_s(sizes[i], r, rates) for i, r in readers(steps, grad)))
    return result


def grads(split: Split, need: dict, input_grad: bool) -> dict:
    """The values a tile computes (the image first, then in ``split.order``) and whether each needs a
    gradient: the image's with ``input_grad``, a node's with trainable parameters or such an input."""
    grad = {split.input: input_grad}
    for node in split.order:
        if split.roles[node] == "spatial" and node is not split.input and not need[node].empty:
            grad[node] = grad_in(split, node, grad) or _facts(split, node)[2]
    return grad


def grad_in(split: Split, node, grad: dict) -> bool:
    """Whether some input of ``node`` needs a gradient (``any`` without a generator: asked per node
    and pass, 51,000 times a prediction)."""
    for i in split.ops[node].inputs:
        if grad.get(i):
            return True
    return False


def bytes_of(split: Split, node, numel, item: int):
    """Bytes of ``node``'s value on a box of ``numel`` positions (a number or an array of them)."""
    return math.prod(split.shapes[node][:2]) * numel * item


def readers(steps: list, grad: dict) -> list[tuple[object, int]]:
    """Values that need a gradient and are read by more than one step, with their readers."""
    count: dict = {}
    for st in steps:
        for i in st.inputs:
            if grad.get(i):
                count[i] = count.get(i, 0) + 1
    return [(i, r) for i, r in count.items() if r > 1]


def accumulation_s(size, readers: int, rates: Rates):
    """Gradients of a value read by several nodes are summed: one add per extra reader (``size``:
    bytes, a number or an array of them)."""
    if isinstance(size, np.ndarray):
        return (readers - 1) * 3 * size / rates.streams("binary", 3 * size)
    return (readers - 1) * 3 * size / rates.stream("binary", 3 * size)


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
    """``peaks`` of many walks at once, one per row: ``steps`` on arrays (``steps.steps_of``), each
    row of a walk picking an entry of each step (``index``: per step, the entry of each row; None:
    the row's own); ``sizes`` per node with a step, its value's bytes on each entry of its step
    (the image's: per row), ``terms`` per sink, per row. Rows whose steps have the same *structure*
    (which values alias, which padded copies autograd keeps) run the same walk with other byte
    counts, so each structure is walked once on names and its byte counts summed on arrays of a
    chunk of rows at a time (``row_walk``); (inference peaks, training peaks) per row. The steps
    hold each distinct step once: a grid's classes share them, and 32,768 classes of 400 nodes
    picked out whole would take a gigabyte."""
    rows = len(sizes[split.input])
    index = index or [slice(None)] * len(steps)
    peak, peak_train = np.zeros(rows, dtype=np.int64), np.zeros(rows, dtype=np.int64)
    if not rows:
        return peak, peak_train
    codes, starts = flag_codes(steps)
    alike = not steps or (np.minimum.reduceat(codes, starts) == np.maximum.reduceat(codes, starts)).all()
    which = np.zeros(rows, dtype=np.int64) if alike else structures(steps, index, rows)
    table = Table(split, steps, sizes, terms, index, rows, codes)
    groups = int(which.max()) + 1
    for g in range(groups):
        members = np.flatnonzero(which == g) if groups > 1 else None
        first = int(members[0]) if groups > 1 else 0
        count = rows if members is None else len(members)
        if count > WIDE:  # thousands of rows: each step's numpy operations long enough
            size, run = CHUNK_ROWS, partial(_stepwise, split, table, first, grad, training, input_copy)
        else:
            program = Program(split, steps, table.codes(first), table.nonzero, grad, training, input_copy)
            size, run = max(1, CHUNK // (4 * len(table.offsets))), partial(program.run, table)
        for start in range(0, count, size):
            chunk = slice(start, start + size) if members is None else members[start : start + size]
            peak[chunk], peak_train[chunk] = run(chunk)
    return peak, peak_train


WIDE = 1024  # rows of one structure past which they are walked step by step (``_stepwise``)
CHUNK_ROWS = 4096  # rows walked together by ``_stepwise``


def _stepwise(split: Split, table: Table, first: int, grad: dict, training: bool, input_copy: bool, chunk):
    """``peaks`` of the rows of ``chunk`` (of one structure, that of row ``first``), step by step on
    their byte counts picked out of ``table``."""
    x, codes, group, sizes = split.input, table.codes(first), [], {}
    own = np.arange(table.rows)[chunk]
    for st, pick, code, start in zip(table.steps, table.index, codes, table.offsets.tolist(), strict=False):
        at = (own if isinstance(pick, slice) else pick[chunk]) + start
        out, temp, padded, extra, sizes[st.node] = (f.take(at) for f in table.fields)
        group.append(Step(st.node, st.inputs, out=out, temp=temp, padded=padded, saved_extra=extra,
                          aliases=bool(code & 1), keeps_padded=bool(code & 2), saves_inputs=bool(code & 4),
                          saves_output=bool(code & 8)))  # fmt: skip
    extra = table.fields[-1].take(table.offsets[len(table.steps) :, None] + own)  # the image's, the terms
    sizes[x] = extra[0]
    return peaks(split, group, sizes, list(extra[1:]), grad, training, input_copy)


def structures(steps: list, index: list, rows: int) -> np.ndarray:
    """Per row, the number of its steps' structures (``structure``) among the rows', in their
    lexicographic order (as renumbering after each step with ``np.unique`` would number them):
    steps alike in every row change no order and are skipped (found on every step's rows at once,
    ``flag_codes``), the others packed 4 bits each until int64 would overflow."""
    which, top, packed = np.zeros(rows, dtype=np.int64), 1, False  # top: above every entry of which
    codes, starts = flag_codes(steps)
    ends = np.append(starts[1:], len(codes))
    full = np.flatnonzero(ends > starts)  # steps with rows
    varying = full[np.minimum.reduceat(codes, starts[full]) != np.maximum.reduceat(codes, starts[full])] \
        if len(full) else full  # fmt: skip
    for t in varying.tolist():
        code = codes[starts[t] : ends[t]]
        if top * 16 > 2**62:
            _, which = np.unique(which, return_inverse=True)
            which, top = which.reshape(-1), int(which.max(initial=0)) + 1
        which, top, packed = which * 16 + code[index[t]], top * 16, True
    if packed:
        which = np.unique(which, return_inverse=True)[1].reshape(-1)
    return which


def flag_codes(steps: list) -> tuple[np.ndarray, np.ndarray]:
    """Every step's ``structure`` on each of its rows, end to end (int64), and where each step's start."""
    starts = np.cumsum([0] + [len(st.aliases) for st in steps])
    if not steps:
        return np.zeros(0, dtype=np.int64), starts[:-1]
    a, k = np.concatenate([st.aliases for st in steps]), np.concatenate([st.keeps_padded for st in steps])
    i = np.concatenate([st.saves_inputs for st in steps])
    o = np.concatenate([st.saves_output for st in steps])
    return a + 2 * k.astype(np.int64) + 4 * i + 8 * o, starts[:-1]


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


def last_tile(split: Split, lay: Layout) -> tuple[dict, tuple]:
    """The node boxes and write boxes of the grid's last tile with work: the engine runs it last in
    the forward with autograd and keeps its graph, so a training step does not recompute it (the
    tiles past it write nothing: a network of valid convolutions writes less than its input)."""
    tiles = Tiles.of(split, lay)
    return tile_at(split, lay, tiles.index(len(tiles) - 1))


def tile_at(split: Split, lay: Layout, index: tuple[int, ...]) -> tuple[dict, tuple]:
    """The node boxes and write boxes of the tile at grid ``index``."""
    writes = tuple(write_box(index, lay, split.strides[k], split.extents[k]) for k in split.sinks)
    return needs(split, dict(zip(split.sinks, writes, strict=True))), writes


def walked(working: tuple[int, ...]) -> set[tuple[int, ...]]:
    """The grid indices whose tiles a memory bound walks, of a grid with ``working`` tiles with work
    per dimension: the middle one (whole-size boxes, away from the borders), and where a dimension
    has two tiles, also the first (the second may be a remainder)."""
    return {tuple(c // 2 for c in working), tuple(0 if c == 2 else c // 2 for c in working)}
