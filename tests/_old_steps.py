# ruff: noqa: F402  (verbatim: _peaks calls walk.grad_in, steps_of names its argument so)
"""``memory_bound._peaks`` and ``_rows``, and the ``steps.steps_of`` it called (``memo_context``,
``_steps_of``, ``_conv_steps``, ``_stream_steps``) as they were at 93d0848: the reference of
tests/test_steps_fast.py (``bytes_only.byte_steps`` against ``old__steps_of``), verbatim but for this
docstring, the imports, the names (``old_``) and ``steps.MEMO``."""

from __future__ import annotations

import math

import numpy as np

from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose, Pad, Resample, Slice
from bigpicture.engine.rules.window import AvgPool, Conv, MaxPool, Pool
from bigpicture.engine.split import Split
from bigpicture.perf import steps
from bigpicture.perf.conv_rates import conv_rates
from bigpicture.perf.conv_work import conv_work
from bigpicture.perf.fusion import fuse
from bigpicture.perf.memory_bound import _numels, _padding
from bigpicture.perf.rates import PARALLEL_ELEMENTS, Rates
from bigpicture.perf.row_memo import Rows, join_rows, step_memo
from bigpicture.perf.step_rates import _per_byte, _rates
from bigpicture.perf.steps import (
    _FIELDS,
    _NORM,
    _SAVE_NOTHING,
    _SAVE_OUTPUT,
    _VIEWS,
    ALWAYS_PARALLEL,
    Step,
    _facts,
    _gradient_sum_s,
    _stream_kind,
)  # fmt: skip
from bigpicture.perf.walk import bytes_of, grad_in, grads, row_peaks


def old_steps_of(
    split: Split, node, rows: Rows, item: int, rates: Rates, grad_in: bool, least: bool = False
) -> Step:
    """The steps of ``node`` on every row of ``rows`` at once: a ``Step`` whose numbers, flags and
    kind are arrays with one entry per row (``row`` takes one out). ``least``: a normalisation's rows
    at the faster of its plain and strided rates (the time bound's, with nothing copied).

    Steps built before on the same rows for this node (another pass, candidate tile or bound) are
    read back from a memo on ``rates`` (``row_memo.StepMemo``)."""
    if not steps.MEMO:
        return old__steps_of(split, node, rows, item, rates, grad_in, least)
    key = (old_memo_context(split, node, rows, item, rates, grad_in, least), rows.key())

    def compute() -> dict:
        st = old__steps_of(split, node, rows, item, rates, grad_in, least)
        return {f: getattr(st, f) for f in _FIELDS}

    return Step(node, tuple(split.ops[node].inputs), **step_memo(rates).get(key, compute))


def old_memo_context(split: Split, node, rows: Rows, item: int, rates: Rates, grad_in: bool, least: bool):
    """``steps_of``'s memo key without the rows' numbers (grad_in: a convolution's; least: a norm's)."""
    op, fused = split.ops[node], getattr(rates, "fused", False)
    conv, norm = isinstance(op, (Conv, ConvTranspose)), _facts(split, node)[0] in _NORM
    return (node, op, split.shapes[node], tuple([i for i, _ in rows.inputs]), item, conv and grad_in,
            norm and least, rates.wake_s, fused, split.sinks if fused else None)  # fmt: skip


def old__steps_of(
    split: Split, node, rows: Rows, item: int, rates: Rates, grad_in: bool, least: bool = False
) -> Step:
    """``steps_of`` without the memo: every row built."""
    op, shape = split.ops[node], split.shapes[node]
    n, c, r = shape[0], shape[1], len(rows.numel)
    ins = tuple(op.inputs)
    elems = n * c * rows.numel
    in_bytes = sum(
        (math.prod(split.shapes[i][:2]) * numel * item for i, numel in rows.inputs), np.zeros(r, np.int64)
    )
    name, inplace, _ = _facts(split, node)
    outside = rows.outside & rows.copied
    view = np.full(r, name in _VIEWS or isinstance(op, Slice)) | (isinstance(op, Pad) & ~outside)
    zero, no = np.zeros(r, dtype=np.int64), np.zeros(r, dtype=bool)
    st = Step(node, ins, np.where(view | inplace, 0, elems * item), aliases=view | inplace, temp=zero,
              padded=zero, saves_inputs=no, saves_output=no, saved_extra=zero, keeps_padded=no,
              kind=np.empty(r, dtype=object), flops=zero, bytes=in_bytes + elems * item,
              fwd_s=np.zeros(r), bwd_s=np.zeros(r), flops_bwd=zero)  # fmt: skip
    st.kind.fill("unary")  # one str for every row (``np.full`` converts it row by row: 15x slower)
    pad_copy = zero
    padded_numel = rows.padded.prod(axis=1)
    if isinstance(op, Window):  # a Pad op's padded copy is its own output
        # An op that pads natively (engine/rules/window.py) reads a view of its input at the image
        # border, padded by the kernel itself: no padded copy, and autograd keeps the input. Its
        # sub-box reads inside the image are still charged a contiguous copy.
        native = op.pads_natively(not rates.gpu)
        copied = rows.copied & ~rows.outside if native else rows.copied
        pad_copy = np.where(copied, math.prod(split.shapes[ins[0]][:2]) * padded_numel * item, 0)
        st.temp = pad_copy
        st.padded = np.where(outside, pad_copy, 0)  # autograd saves the padded copy, not a contiguous one
        st.keeps_padded = st.padded > 0
    kind, views = ("conv" if isinstance(op, (Conv, ConvTranspose)) else "pool"), no  # no row a view
    if isinstance(op, (Conv, ConvTranspose)):
        old__conv_steps(split, op, st, rows, n, c, item, rates, grad_in)
    elif isinstance(op, Pool):
        window = elems * math.prod(op.kernel)
        st.kind[:], st.saves_inputs = "pool", ~no
        st.saved_extra = elems * 8 if isinstance(op, MaxPool) else zero
        if isinstance(op, AvgPool):
            st.temp = st.temp + elems * item  # window sums, then divided
        st.fwd_s = np.array([max(w / rates.pool(w), b / rates.stream("unary", b))
                             for w, b in zip(window.tolist(), st.bytes.tolist(), strict=True)])  # fmt: skip
        st.bwd_s = np.array([max(w / rates.pool(w, True), 2 * b / rates.stream("unary", 2 * b))
                             for w, b in zip(window.tolist(), st.bytes.tolist(), strict=True)])  # fmt: skip
    else:
        strided, views = None if least else rows.copied, view & ~np.bool_(inplace)
        kind = old__stream_steps(op, name, st, views, elems, item, rates, strided)
    if isinstance(op, Window):
        st.fwd_s = st.fwd_s + _per_byte(2 * pad_copy, rates.streams("copy", 2 * pad_copy))
    # it runs on every thread, waking them first: convolutions (oneDNN, BLAS) and pooling at any size
    # (kind ALWAYS_PARALLEL: every row but a view), the others past PARALLEL_ELEMENTS
    woken = ~views & ((kind in ALWAYS_PARALLEL) | (elems >= PARALLEL_ELEMENTS))
    st.fwd_s = np.where(woken, st.fwd_s + rates.wake_s, st.fwd_s)
    st.bwd_s = np.where(woken & (st.bwd_s != 0), st.bwd_s + rates.wake_s, st.bwd_s)
    if getattr(rates, "fused", False):  # compiled tiles: memory-bound chains fused (perf/fusion.py)
        fuse(split, node, st)
    st.bwd_s = st.bwd_s + _gradient_sum_s(split, node, rates)
    return st


def old__conv_steps(split: Split, op, st: Step, rows: Rows, n: int, c: int, item: int, rates: Rates, grad_in):
    """``steps_of`` for a convolution: its work, workspace and seconds (from ``rates.conv``)."""
    ins, nd = tuple(op.inputs), split.nd
    transposed = isinstance(op, ConvTranspose)
    st.kind[:], st.saves_inputs, stride = "conv", np.ones(len(rows.numel), dtype=bool), max(op.step)
    cin = split.shapes[ins[0]][1]
    fan_in, positions, st.flops = conv_work(op, transposed, n, cin, c, rows.numel, rows.extra)
    read = n * cin * (rows.padded if not transposed else rows.extra).prod(axis=1) * item
    # the column matrix: input channels x kernel per output position (a transposed convolution
    # scatters output channels x kernel per input position)
    im2col = n * (c * positions // n if transposed else cin * rows.numel) * math.prod(op.kernel) * item
    st.temp = st.temp + rates.workspaces(nd, np.maximum(read, st.out), im2col, transposed)
    st.flops_bwd = st.flops * (2 if grad_in else 1)
    case = (transposed, cin // (1 if transposed else op.groups), math.prod(op.kernel))
    lengths = rows.extra if transposed else rows.padded
    # a transposed convolution of an empty input box (a tile reading padding only): no work, no seconds
    fwd, bwd = conv_rates(op, lengths, positions, n, cin, c, transposed, nd, fan_in, stride, case, rates)
    st.fwd_s, st.bwd_s = st.flops / fwd, st.flops_bwd / bwd


def old__stream_steps(
    op, name: str, st: Step, view: np.ndarray, elems, item: int, rates: Rates, strided: np.ndarray | None
) -> str:
    """``steps_of`` for a memory-bound op (rows where it is a view of its input move nothing; a
    normalisation's ``strided`` rows read a strided view, at the rate calibrated for that): its kind."""
    kind = _stream_kind(op, name)
    st.kind = np.array([kind, "view"], dtype=object).take(view.astype(np.intp))
    st.saves_output = ~view & (name in _SAVE_OUTPUT)
    st.saves_inputs = ~view & (
        name not in _SAVE_OUTPUT and name not in _SAVE_NOTHING and not isinstance(op, (Pad, Resample))
    )
    moved = np.where(st.saves_inputs | st.saves_output, 3 * elems * item, 0)
    st.fwd_s = np.where(view, 0.0, _per_byte(st.bytes, _rates(rates, kind, st.bytes, strided)))
    st.bwd_s = _per_byte(moved, _rates(rates, kind, moved, strided, backward=True))
    return kind


def old__peaks(splits: list[Split], walks: list, item: int, rates, training: bool) -> list:
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
            rows = old__rows(s, node, needs, copy, numel)
            key = (node, id(s.ops[node]), grad_in(s, node, grad), tuple(i for i, _ in rows.inputs))
            calls.setdefault(key, []).append((w, rows))
    steps: list[dict] = [{} for _ in walks]  # per group, node -> (its steps over every group, sizes, rows)
    for (node, _, grad_input, _), parts in calls.items():
        s = splits[walks[parts[0][0]][0]]
        rows = join_rows([r for _, r in parts])
        st, start = old_steps_of(s, node, rows, item, rates, grad_input), 0
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


def old__rows(split: Split, node, needs: list[dict], copy: bool, numel: dict) -> Rows:
    """The geometries of ``node``'s step in each walk, as ``steps.node_step`` makes them one at a
    time; ``numel``: the boxes' positions (``_numels``). A window's (or padding's) padded box is
    made once per walk (``_padding``), not by ``steps.geometries`` and ``op.padded_box`` apart."""
    op, nd = split.ops[node], split.nd
    boxes = [need[node] for need in needs]
    ones = [(1,) * nd] * len(needs)
    if isinstance(op, (Window, Pad)):  # only they read out of the image or a sub-box
        copied, outside, padded = zip(*(_padding(split, node, op, need, copy) for need in needs), strict=True)
    else:
        copied = outside = (False,) * len(needs)
    return Rows(
        numel[node],
        tuple((i, numel[i]) for i in op.inputs if i in needs[0]),
        np.array(padded if isinstance(op, Window) else ones, dtype=np.int64),
        np.array([op.needs(b)[0].shape for b in boxes] if isinstance(op, ConvTranspose) else ones,
                 dtype=np.int64),  # fmt: skip
        np.array([c and o for c, o in zip(copied, outside, strict=True)]),
        np.array(copied),
    )
