"""The rows of a node's steps (``Rows``), and a memo of the steps built on them (``StepMemo``).

The planner builds the steps of a node (``steps.steps_of``) on the same rows again and again: per
pass of a many-pass network (pass k recomputes every node of passes 1..k-1, often with the same
box lengths), per candidate tile, and for its time and memory bounds. A step depends only on the
node and its rows, so each is built once and read back, the same numbers bit for bit:

    (node's context, its rows' bytes)  --known-->  the step's arrays (read-only)
                                       --new---->  steps_of builds them, kept as they are

A step is kept as the arrays it was built as, made read-only (``freeze``), not copied: the steps
of a batch (``step_batch``) as views of the joined step's. Most are never asked again (the passes
of one prediction share a call, the candidate tiles differ in their rows), so keeping must cost
next to nothing; a hit then costs a dict look-up.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rows:
    """Geometries of one node's step, one entry per row (numpy arrays): what ``steps_of`` needs.

    ``numel``: positions of the node's box; ``inputs``: of each spatial input's box the tile
    computes; ``padded``, ``extra``: per dimension, lengths of a window's padded input box and of
    a transposed convolution's input box (1 where the op has none); ``outside``: the window
    reaches out of the image; ``copied``: its input is copied first (padded, or a sub-box).

    The arrays are never written once in a ``Rows`` (several share them: ``node_rows.RowShare``),
    so two rows alive at once with the same arrays (``ident``) have the same ``key``."""

    numel: np.ndarray
    inputs: tuple[tuple[object, np.ndarray], ...]
    padded: np.ndarray  # (rows, nd)
    extra: np.ndarray  # (rows, nd)
    outside: np.ndarray
    copied: np.ndarray

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.numel, *[n for _, n in self.inputs], self.padded, self.extra, self.outside, self.copied)

    def key(self) -> tuple:
        """The rows as a key (``StepMemo``): the arrays' dtypes and shapes, and their bytes in one."""
        arrays = self.arrays()
        return tuple([(a.dtype.char, a.shape) for a in arrays]), b"".join([a.tobytes() for a in arrays])

    def ident(self) -> tuple:
        """The identities of the arrays: equal for two rows alive at once only if their ``key`` is."""
        return tuple(map(id, self.arrays()))


def join_rows(rows: list[Rows]) -> Rows:
    """The rows of several ``Rows`` (of one node, alike in their inputs) as one: one ``steps_of``."""
    if len(rows) == 1:
        return rows[0]
    inputs = tuple(
        (i, np.concatenate([r.inputs[k][1] for r in rows])) for k, (i, _) in enumerate(rows[0].inputs)
    )
    fields = ("numel", "padded", "extra", "outside", "copied")
    return Rows(**{f: np.concatenate([getattr(r, f) for r in rows]) for f in fields}, inputs=inputs)


# rows kept over the steps (~150 bytes each with their key); past that, the oldest go (a batch's views
# keep its whole joined step: the oldest batch kept may hold more rows than it counts)
MAX_ROWS = 1 << 17


class StepMemo:
    """Steps on arrays (their fields, one entry per row) by a key of the node's context and its rows'
    table: the read-only arrays they were built as (``freeze``), kept in the order put."""

    def __init__(self) -> None:
        self.entries: dict = {}
        self.order: deque = deque()  # (key, rows) of each entry, the oldest first
        self.rows = 0

    def get(self, key, compute) -> dict:
        """The fields of the step of ``key``: ``compute()``'s, made read-only and kept for the next time."""
        found = self.entries.get(key)
        if found is None:
            found = freeze(compute())
            self.put(key, found)
        return found

    def find(self, key) -> dict | None:
        """The fields kept for ``key`` (read-only arrays), or None."""
        return self.entries.get(key)

    def put(self, key, fields: dict) -> None:
        """Keep ``fields`` (read-only arrays, never written: ``freeze``) for ``key``, not yet kept; the
        oldest dropped past ``MAX_ROWS`` rows."""
        rows = len(fields["kind"])
        self.rows += rows
        while self.order and self.rows > MAX_ROWS:
            old, n = self.order.popleft()
            del self.entries[old]
            self.rows -= n
        self.entries[key] = fields
        self.order.append((key, rows))


def freeze(fields: dict) -> dict:
    """``fields`` with their arrays made read-only: kept in the memo and read back by every later
    caller, so nobody may write into them (nor into what they are views of)."""
    for a in fields.values():
        a.flags.writeable = False
    return fields


def step_memo(rates) -> StepMemo:
    """The memo of steps kept on ``rates`` (made on first use): its numbers are the steps'."""
    memo = rates.__dict__.get("_steps")
    if memo is None:
        memo = rates.__dict__["_steps"] = StepMemo()
    return memo
