"""The step memo and its batch as they were at 0effb00 (``row_memo.Rows.key``, ``StepMemo`` with
``_pack``, ``join_rows``, ``step_batch.steps_many``, ``steps.steps_of`` / ``_steps_of`` /
``_stream_steps``, ``untiled.untiled_flops``): the reference of tests/test_step_memo_fast.py,
verbatim but for these docstrings, the imports and the names (``old_``)."""

from __future__ import annotations

import math

import numpy as np
import torch

from bigpicture.engine.box import Box
from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose, Pad, Resample, Slice
from bigpicture.engine.rules.window import AvgPool, Conv, MaxPool, Pool
from bigpicture.perf.fusion import fuse
from bigpicture.perf.rates import PARALLEL_ELEMENTS
from bigpicture.perf.step_rates import _per_byte, _rates
from bigpicture.perf.steps import (
    _FIELDS,
    _SAVE_NOTHING,
    _SAVE_OUTPUT,
    _VIEWS,
    ALWAYS_PARALLEL,
    Step,
    _conv_steps,
    _facts,
    _gradient_sum_s,
    _outside,
    _stored,
    _stream_kind,
    geometries,
    memo_context,
    spatial_inputs,
    step_key,
)  # fmt: skip
from bigpicture.perf.walk import grad_in as _grad_in
from bigpicture.perf.walk import grads

MAX_ROWS = 1 << 17
_INTS = ("out", "temp", "padded", "saved_extra", "flops", "bytes", "flops_bwd")
_FLOATS = ("fwd_s", "bwd_s")
_BOOLS = ("saves_inputs", "saves_output", "aliases", "keeps_padded")


def old_key(rows) -> tuple:
    arrays = (rows.numel, *(n for _, n in rows.inputs), rows.padded, rows.extra, rows.outside)
    arrays += (rows.copied,)
    return tuple([(a.dtype.char, a.shape) for a in arrays]), b"".join([a.tobytes() for a in arrays])


def old_join_rows(rows: list):
    from bigpicture.perf.row_memo import Rows

    if len(rows) == 1:
        return rows[0]
    inputs = tuple(
        (i, np.concatenate([r.inputs[k][1] for r in rows])) for k, (i, _) in enumerate(rows[0].inputs)
    )
    fields = ("numel", "padded", "extra", "outside", "copied")
    return Rows(**{f: np.concatenate([getattr(r, f) for r in rows]) for f in fields}, inputs=inputs)


class OldStepMemo:
    def __init__(self) -> None:
        self.entries: dict = {}
        self.rows = 0

    def get(self, key, compute) -> dict:
        found = self.find(key)
        if found is not None:
            return found
        fields = compute()
        self.put(key, fields)
        return fields

    def find(self, key) -> dict | None:
        packed = self.entries.get(key)
        if packed is None:
            return None
        ints, floats, flags, kind = packed
        out = dict(zip(_INTS, ints, strict=True)) | dict(zip(_FLOATS, floats, strict=True))
        return out | dict(zip(_BOOLS, flags, strict=True)) | {"kind": kind}

    def put(self, key, fields: dict) -> None:
        packed = _pack(fields)
        if packed is not None:
            self.rows += len(packed[3])
            while self.entries and self.rows > MAX_ROWS:
                self.rows -= len(self.entries.pop(next(iter(self.entries)))[3])
            self.entries[key] = packed


def old_step_memo(rates) -> OldStepMemo:
    memo = rates.__dict__.get("_old_steps")
    if memo is None:
        memo = rates.__dict__["_old_steps"] = OldStepMemo()
    return memo


def _pack(fields: dict) -> tuple | None:
    kinds = ((_INTS, np.int64), (_FLOATS, np.float64), (_BOOLS, np.bool_))
    if any(fields[f].dtype != dtype or fields[f].ndim != 1 for names, dtype in kinds for f in names):
        return None
    if fields["kind"].dtype != object:
        return None
    packed = tuple(np.array([fields[f] for f in names]) for names, _ in kinds) + (fields["kind"].copy(),)
    for a in packed:
        a.flags.writeable = False
    return packed


def old_steps_many(calls: list[tuple], item: int, rates, memo: bool = True) -> list:
    out: list = [None] * len(calls)
    memo = old_step_memo(rates) if memo else None
    groups: dict = {}
    contexts: dict = {}
    for k, (split, node, rows, grad_in) in enumerate(calls):
        asked = (id(split), node, grad_in, *[i for i, _ in rows.inputs])
        context = contexts.get(asked)
        if context is None:
            context = contexts[asked] = memo_context(split, node, rows, item, rates, grad_in, False)
        key = old_key(rows)
        found = memo.find((context, key)) if memo is not None else None
        if found is not None:
            out[k] = Step(node, tuple(split.ops[node].inputs), **found)
        else:
            groups.setdefault(context, {}).setdefault(key, []).append(k)
    for context, parts in groups.items():
        split, node, _, grad_in = calls[next(iter(parts.values()))[0]]
        rows = old_join_rows([calls[ks[0]][2] for ks in parts.values()])
        st, start = old__steps_of(split, node, rows, item, rates, grad_in), 0
        for key, ks in parts.items():
            end = start + len(calls[ks[0]][2].numel)
            fields = {f: getattr(st, f)[start:end] for f in _FIELDS}
            if memo is not None:
                memo.put((context, key), fields)
            for k in ks:
                out[k] = Step(node, st.inputs, **fields)
            start = end
    return out


def old_steps_of(split, node, rows, item: int, rates, grad_in: bool, least: bool = False, memo: bool = True):
    if not memo:
        return old__steps_of(split, node, rows, item, rates, grad_in, least)
    key = (memo_context(split, node, rows, item, rates, grad_in, least), old_key(rows))

    def compute() -> dict:
        st = old__steps_of(split, node, rows, item, rates, grad_in, least)
        return {f: getattr(st, f) for f in _FIELDS}

    return Step(node, tuple(split.ops[node].inputs), **old_step_memo(rates).get(key, compute))


def old__steps_of(split, node, rows, item: int, rates, grad_in: bool, least: bool = False) -> Step:
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
              kind=np.full(r, "unary", dtype=object), flops=zero, bytes=in_bytes + elems * item,
              fwd_s=np.zeros(r), bwd_s=np.zeros(r), flops_bwd=zero)  # fmt: skip
    pad_copy = zero
    padded_numel = rows.padded.prod(axis=1)
    if isinstance(op, Window):
        native = op.pads_natively(not rates.gpu)
        copied = rows.copied & ~rows.outside if native else rows.copied
        pad_copy = np.where(copied, math.prod(split.shapes[ins[0]][:2]) * padded_numel * item, 0)
        st.temp = pad_copy
        st.padded = np.where(outside, pad_copy, 0)
        st.keeps_padded = st.padded > 0
    if isinstance(op, (Conv, ConvTranspose)):
        _conv_steps(split, op, st, rows, n, c, item, rates, grad_in)
    elif isinstance(op, Pool):
        window = elems * math.prod(op.kernel)
        st.kind[:], st.saves_inputs = "pool", ~no
        st.saved_extra = elems * 8 if isinstance(op, MaxPool) else zero
        if isinstance(op, AvgPool):
            st.temp = st.temp + elems * item
        st.fwd_s = np.array([max(w / rates.pool(w), b / rates.stream("unary", b))
                             for w, b in zip(window.tolist(), st.bytes.tolist(), strict=True)])  # fmt: skip
        st.bwd_s = np.array([max(w / rates.pool(w, True), 2 * b / rates.stream("unary", 2 * b))
                             for w, b in zip(window.tolist(), st.bytes.tolist(), strict=True)])  # fmt: skip
    else:
        strided = None if least else rows.copied
        _old_stream_steps(op, name, st, view & ~np.bool_(inplace), elems, item, rates, strided)
    if isinstance(op, Window):
        st.fwd_s = st.fwd_s + _per_byte(2 * pad_copy, rates.streams("copy", 2 * pad_copy))
    parallel = np.array([k in ALWAYS_PARALLEL for k in st.kind.tolist()], dtype=bool)
    woken = parallel | ((st.kind != "view") & (elems >= PARALLEL_ELEMENTS))
    st.fwd_s = np.where(woken, st.fwd_s + rates.wake_s, st.fwd_s)
    st.bwd_s = np.where(woken & (st.bwd_s != 0), st.bwd_s + rates.wake_s, st.bwd_s)
    if getattr(rates, "fused", False):
        fuse(split, node, st)
    st.bwd_s = st.bwd_s + _gradient_sum_s(split, node, rates)
    return st


def _old_stream_steps(op, name: str, st: Step, view, elems, item: int, rates, strided) -> None:
    kind = _stream_kind(op, name)
    st.kind = np.where(view, "view", kind).astype(object)
    st.saves_output = ~view & (name in _SAVE_OUTPUT)
    st.saves_inputs = ~view & (
        name not in _SAVE_OUTPUT and name not in _SAVE_NOTHING and not isinstance(op, (Pad, Resample))
    )
    moved = np.where(st.saves_inputs | st.saves_output, 3 * elems * item, 0)
    st.fwd_s = np.where(view, 0.0, _per_byte(st.bytes, _rates(rates, kind, st.bytes, strided)))
    st.bwd_s = _per_byte(moved, _rates(rates, kind, moved, strided, backward=True))


def _old_step(split, node, box: Box, copied: bool, need: dict, item: int, rates, grad_in: bool) -> Step:
    from bigpicture.perf.row_memo import Rows
    from bigpicture.perf.steps import row

    op = split.ops[node]
    padded = op.padded_box(box).shape if isinstance(op, Window) else (1,) * split.nd
    extra = op.needs(box)[0].shape if isinstance(op, ConvTranspose) else (1,) * split.nd
    rows = Rows(
        np.array([box.numel], dtype=np.int64),
        tuple((i, np.array([need[i].numel], dtype=np.int64)) for i in op.inputs if i in need),
        np.array([padded], dtype=np.int64),
        np.array([extra], dtype=np.int64),
        np.array([copied and isinstance(op, (Window, Pad)) and _outside(op, box)]),
        np.array([copied]),
    )
    return row(old_steps_of(split, node, rows, item, rates, grad_in), 0)


def _old_node_step(split, node, need: dict, grad_in: bool, input_copy: bool, item: int, rates, memo: dict):
    stored = _stored(split, spatial_inputs(split, node, need), need, input_copy)
    key = step_key(node, geometries(split, node, need, stored), grad_in)
    if key not in memo:
        copied = key[1] or key[2]
        memo[key] = _old_step(split, node, need[node], copied, need, item, rates, grad_in)
    return memo[key]


def old_untiled_flops(split, dtype: torch.dtype, rates, memo: dict) -> int:
    whole = {n: Box.from_shape(e) for n, e in split.extents.items()}
    grad = grads(split, whole, False)
    item, fused = torch.empty((), dtype=dtype).element_size(), getattr(rates, "fused", False)
    total = 0
    for node in list(grad)[1:]:
        op, needs_grad = split.ops[node], _grad_in(split, node, grad)
        inputs = tuple((i, i is split.input, split.shapes.get(i)) for i in op.inputs)
        key = (node, op, split.shapes[node], inputs, needs_grad, item, split.sinks if fused else None)
        if key not in memo:
            memo[key] = _old_node_step(split, node, whole, needs_grad, False, item, rates, {}).flops
        total += memo[key]
    return total
