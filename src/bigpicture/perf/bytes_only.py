"""Rates that count bytes only: a walk with them gives a tile's memory without its time.

Memory bounds and least-memory tiles walk many steps whose times nobody reads; every rate answered
with 1 and no CPU backend asked of torch (``conv_rates.backends_of``) keeps the same byte counts
(the workspace is the rates' own) for a fraction of the cost. Split from walk.py (the module budget).

``byte_steps`` goes further for a walk of peaks alone (``memory_bound._peaks``): a node's steps on
rows with only what ``walk.row_peaks`` reads (byte counts and flags, as ``steps._steps_of`` makes
them, the same arrays), no seconds, no work, no kinds, no memo (its rows are rarely asked again).
"""

from __future__ import annotations

import math

import numpy as np

from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose, Pad, Resample, Slice
from bigpicture.engine.rules.window import AvgPool, Conv, MaxPool, Pool
from bigpicture.engine.split import Split
from bigpicture.perf.conv_work import conv_work
from bigpicture.perf.rates import Rates
from bigpicture.perf.row_memo import Rows
from bigpicture.perf.steps import _SAVE_NOTHING, _SAVE_OUTPUT, _VIEWS, Step, _facts


class _BytesOnly:
    """``rates`` that answer every rate with 1 and pick no backend: a walk with them counts the same
    bytes (the workspace is the rates' own) for a fraction of the cost, for memory bounds."""

    measured = False  # no CPU backend asked of torch (conv_rates.backends_of)

    def __init__(self, rates: Rates) -> None:
        self._rates = rates

    def __getattr__(self, name: str):
        return getattr(self._rates, name)

    def conv(self, *args, **kwargs) -> float:
        return 1.0

    def convs(self, nd: int, fan_in: int, cout: int, positions: list, *args) -> list:
        return [1.0] * len(positions)

    def pool(self, *args, **kwargs) -> float:
        return 1.0

    def stream(self, *args, **kwargs) -> float:
        return 1.0

    def streams(self, kind: str, nbytes, backward: bool = False) -> np.ndarray:
        return np.ones(np.shape(nbytes))


def bytes_only(rates: Rates) -> _BytesOnly:
    """The byte-counting stand-in of ``rates`` (``_BytesOnly``), one per rates."""
    if "_bytes_only" not in rates.__dict__:
        rates.__dict__["_bytes_only"] = _BytesOnly(rates)
    return rates.__dict__["_bytes_only"]


def byte_steps(split: Split, node, rows: Rows, item: int, rates: Rates) -> Step:
    """``steps._steps_of(split, node, rows, item, rates, ...)``'s byte counts and flags (``out``,
    ``temp``, ``padded``, ``saved_extra``, ``aliases``, ``keeps_padded``, ``saves_inputs``,
    ``saves_output``: what a walk's peaks read), the same arrays; the other fields left unset (their
    defaults). Bytes depend on no rate (a workspace is ``rates.workspaces``), nor on fusion."""
    op, shape = split.ops[node], split.shapes[node]
    r, n, c = len(rows.numel), shape[0], shape[1]
    elems = n * c * rows.numel
    name, inplace, _ = _facts(split, node)
    named, window = name in _VIEWS or isinstance(op, Slice), isinstance(op, Window)
    outside = rows.outside & rows.copied if window or isinstance(op, Pad) else None
    if isinstance(op, Pad):  # a view where it reaches out nowhere
        view = ~outside | named
        aliases = view | inplace
        out = np.where(aliases, 0, elems * item)
    else:  # one flag for every row: ``_steps_of``'s arrays of it
        view, aliases = named, named or inplace
        out = np.zeros(r, dtype=elems.dtype) if aliases else elems * item
        aliases = _flags(r, aliases)
    zero, no = np.zeros(r, dtype=np.int64), np.zeros(r, dtype=bool)
    temp = padded = saved_extra = zero
    keeps_padded = saves_inputs = saves_output = no
    if window:
        copied = rows.copied & ~rows.outside if op.pads_natively(not rates.gpu) else rows.copied
        channels = math.prod(split.shapes[op.inputs[0]][:2])
        temp = np.where(copied, channels * rows.padded.prod(axis=1) * item, 0)
        padded = np.where(outside, temp, 0)
        keeps_padded = padded > 0
    if isinstance(op, (Conv, ConvTranspose)):
        saves_inputs = np.ones(r, dtype=bool)
        temp = temp + _workspace(split, op, rows, n, c, item, out, rates)
    elif isinstance(op, Pool):
        saves_inputs = ~no
        saved_extra = elems * 8 if isinstance(op, MaxPool) else zero
        if isinstance(op, AvgPool):
            temp = temp + elems * item
    else:
        saved = name in _SAVE_OUTPUT
        inputs = not saved and name not in _SAVE_NOTHING and not isinstance(op, (Pad, Resample))
        if isinstance(view, bool):
            views = view and not inplace
            saves_output, saves_inputs = _flags(r, not views and saved), _flags(r, not views and inputs)
        else:
            views = view & ~np.bool_(inplace)
            saves_output, saves_inputs = ~views & saved, ~views & inputs
    return Step(node, tuple(op.inputs), out, temp=temp, padded=padded, saves_inputs=saves_inputs,
                saves_output=saves_output, saved_extra=saved_extra, aliases=aliases,
                keeps_padded=keeps_padded)  # fmt: skip


def _flags(r: int, flag: bool) -> np.ndarray:
    """``np.full(r, flag)`` (bool), without ``np.full``'s Python."""
    return np.ones(r, dtype=bool) if flag else np.zeros(r, dtype=bool)


def _workspace(split: Split, op, rows: Rows, n: int, c: int, item: int, out: np.ndarray, rates: Rates):
    """A convolution's workspace bytes per row (``steps._conv_steps``' ``rates.workspaces``)."""
    transposed, cin = isinstance(op, ConvTranspose), split.shapes[op.inputs[0]][1]
    _, positions, _ = conv_work(op, transposed, n, cin, c, rows.numel, rows.extra)
    read = n * cin * (rows.padded if not transposed else rows.extra).prod(axis=1) * item
    im2col = n * (c * positions // n if transposed else cin * rows.numel) * math.prod(op.kernel) * item
    return rates.workspaces(split.nd, np.maximum(read, out), im2col, transposed)
