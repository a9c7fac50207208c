"""The rows of a node's steps (``Rows``), and a memo of the steps built on them (``StepMemo``).

The planner builds the steps of a node (``steps.steps_of``) on the same rows again and again: per
pass of a many-pass network (pass k recomputes every node of passes 1..k-1, often with the same
box lengths), per candidate tile, and for its time and memory bounds. A step depends only on the
node and its rows, so each is built once and read back, the same numbers bit for bit:

    (node's context, its rows' bytes)  --known-->  the step's arrays (read-only views)
                                       --new---->  steps_of builds them, kept
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rows:
    """Geometries of one node's step, one entry per row (numpy arrays): what ``steps_of`` needs.

    ``numel``: positions of the node's box; ``inputs``: of each spatial input's box the tile
    computes; ``padded``, ``extra``: per dimension, lengths of a window's padded input box and of
    a transposed convolution's input box (1 where the op has none); ``outside``: the window
    reaches out of the image; ``copied``: its input is copied first (padded, or a sub-box)."""

    numel: np.ndarray
    inputs: tuple[tuple[object, np.ndarray], ...]
    padded: np.ndarray  # (rows, nd)
    extra: np.ndarray  # (rows, nd)
    outside: np.ndarray
    copied: np.ndarray

    def key(self) -> tuple:
        """The rows as a key (``StepMemo``): the arrays' dtypes and shapes, and their bytes in one."""
        arrays = (self.numel, *(n for _, n in self.inputs), self.padded, self.extra, self.outside)
        arrays += (self.copied,)
        return tuple([(a.dtype.char, a.shape) for a in arrays]), b"".join([a.tobytes() for a in arrays])


def join_rows(rows: list[Rows]) -> Rows:
    """The rows of several ``Rows`` (of one node, alike in their inputs) as one: one ``steps_of``."""
    if len(rows) == 1:
        return rows[0]
    inputs = tuple(
        (i, np.concatenate([r.inputs[k][1] for r in rows])) for k, (i, _) in enumerate(rows[0].inputs)
    )
    fields = ("numel", "padded", "extra", "outside", "copied")
    return Rows(**{f: np.concatenate([getattr(r, f) for r in rows]) for f in fields}, inputs=inputs)


MAX_ROWS = 1 << 17  # rows kept over the steps (~150 bytes each with their key); past that, the oldest go
_INTS = ("out", "temp", "padded", "saved_extra", "flops", "bytes", "flops_bwd")
_FLOATS = ("fwd_s", "bwd_s")
_BOOLS = ("saves_inputs", "saves_output", "aliases", "keeps_padded")


class StepMemo:
    """Steps on arrays (their fields, one entry per row) by a key of the node's context and its rows'
    table: packed in four read-only arrays (numbers, seconds, flags, kinds), read back as views."""

    def __init__(self) -> None:
        self.entries: dict = {}
        self.rows = 0

    def get(self, key, compute) -> dict:
        """The fields of the step of ``key``: ``compute()``'s, kept for the next time."""
        found = self.find(key)
        if found is not None:
            return found
        fields = compute()
        self.put(key, fields)
        return fields

    def find(self, key) -> dict | None:
        """The fields kept for ``key`` (read-only views), or None."""
        packed = self.entries.get(key)
        if packed is None:
            return None
        ints, floats, flags, kind = packed
        out = dict(zip(_INTS, ints, strict=True)) | dict(zip(_FLOATS, floats, strict=True))
        return out | dict(zip(_BOOLS, flags, strict=True)) | {"kind": kind}

    def put(self, key, fields: dict) -> None:
        """Keep ``fields`` (copied, packed) for ``key``, the oldest dropped past ``MAX_ROWS`` rows."""
        packed = _pack(fields)
        if packed is not None:
            self.rows += len(packed[3])
            while self.entries and self.rows > MAX_ROWS:
                self.rows -= len(self.entries.pop(next(iter(self.entries)))[3])
            self.entries[key] = packed


def step_memo(rates) -> StepMemo:
    """The memo of steps kept on ``rates`` (made on first use): its numbers are the steps'."""
    memo = rates.__dict__.get("_steps")
    if memo is None:
        memo = rates.__dict__["_steps"] = StepMemo()
    return memo


def _pack(fields: dict) -> tuple | None:
    """The fields in four arrays, or None where one is not of its usual dtype (kept as it is)."""
    kinds = ((_INTS, np.int64), (_FLOATS, np.float64), (_BOOLS, np.bool_))
    if any(fields[f].dtype != dtype or fields[f].ndim != 1 for names, dtype in kinds for f in names):
        return None
    if fields["kind"].dtype != object:
        return None
    packed = tuple(np.array([fields[f] for f in names]) for names, _ in kinds) + (fields["kind"].copy(),)
    for a in packed:
        a.flags.writeable = False  # read back as views by every later caller: nobody writes into them
    return packed
