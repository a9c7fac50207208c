"""A node's rows over a class grid, shared between the nodes and passes that have the same ones.

``classes._node_rows`` turns a node's distinct geometries per dimension (their tile counts, flags
and lengths) into the rows of its distinct steps, the tiles that run each, and per combination of
geometries the row it runs. Those depend on nothing else: not on the node (but for its inputs'
names), not on which kinds of grid index share a geometry, not on the pass. A squeeze-and-excitation
network's 17-51 passes each ask their 300-400 nodes' rows, a quarter of them distinct (SENet154-2d at
16,384^2: 16,349 asked, 4,198 distinct), and a normalisation or an activation after a convolution has
the same lengths as it. So ``RowShare`` keeps each distinct set of rows by that key, for the passes
of one prediction:

    per dimension: (tiles of each geometry, the geometry)  + the op's ``reach``  --known-->  rows
                   (where the lengths follow from those; else the lengths themselves) --new-->  built

The lengths (``lengths_of``) are read off the node's geometry (``steps.geometries``: its box's and
inputs' lengths) with a plain window's padded input length computed from its own length; the rest
(transposed convolutions, other windows) as ``classes._lengths`` computes them, from the boxes.
"""

from __future__ import annotations

import numbers

from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose
from bigpicture.perf.row_memo import Rows


def reach(op) -> tuple | None:
    """Per dimension (stride, dilation x (kernel - 1) + 1) of a window whose padded input's length
    is a function of its output's (``Window.padded_box``'s arithmetic on integers: (n - 1) x stride
    + that), () for an op without a window or a transposed convolution's input, None otherwise."""
    if isinstance(op, ConvTranspose):
        return None
    if not isinstance(op, Window):
        return ()
    if type(op).padded_box is not Window.padded_box:
        return None
    params = (op.step, op.pad_lo, op.dilation, op.kernel)
    if not all(isinstance(v, numbers.Integral) for p in params for v in p):
        return None
    step, _, dilation, kernel = params
    return tuple((int(s), int(d) * (int(k) - 1) + 1) for s, d, k in zip(step, dilation, kernel, strict=True))


def lengths_of(window: tuple, value: tuple, d: int) -> list[int]:
    """``classes._lengths`` along dimension d from the node's geometry there (``value``: its boxes'
    lengths first, none of them empty) and its ``reach`` (not None): the padded input spans
    (n - 1) x stride + reach for an output of length n > 0."""
    if not window:
        return [*value[0], 1, 1]
    s, r = window[d]
    return [*value[0], max((value[0][0] - 1) * s + r, 0), 1]


class RowShare:
    """The rows built for the nodes of one prediction's passes (``classes._node_rows``) by their key:
    each distinct one built once, then handed to each node with its inputs' names. The key is the
    node's geometries per dimension (their tile counts and values) with its op's ``reach`` where the
    lengths follow from those (then not computed on a hit), else the lengths themselves; each
    column's (tiles, geometries) by a number, given once per column object. ``get`` only asks for a
    build; ``build`` then builds every one asked at once (``combos.combos_many``), ``rows`` reads
    them back."""

    def __init__(self) -> None:
        self.built: dict = {}  # key -> its ``_Build``
        self.pending: list = []  # the builds asked since the last ``build``
        self.reach: dict = {}  # node -> its op's ``reach``
        self.numbers: dict = {}  # a column's (tiles, geometries) -> its number
        self.columns: dict = {}  # id of a column -> (the column, kept so its id is its own; its number)

    def get(self, node, op, per_dim: list, boxes: list, shaped: bool, lengths) -> tuple:
        """A ticket for the (rows, tiles, the distinct row of each combination) of the build
        (per_dim, lengths, boxes, shaped) (``combos.combos_many``), or of the same rows built for
        other nodes (their inputs renamed): ``rows(ticket)`` after ``build``. ``lengths()``: the
        lengths from the boxes (``classes._lengths``), where the geometries do not give them."""
        if node not in self.reach:
            self.reach[node] = reach(op)
        window, found = self.reach[node], None
        if window is not None:
            columns = self.columns
            key = [shaped, window, len(boxes)]
            for f in per_dim:  # each column's (tiles, geometries) numbered: hashed once, not per node
                known = columns.get(id(f))
                if known is None or known[0] is not f:
                    number = self.numbers.setdefault((tuple(f[2]), tuple(f[3])), len(self.numbers))
                    known = columns[id(f)] = f, number
                key.append(known[1])
            key = tuple(key)
            found = self.built.get(key)
            if found is None and all(len(v[0]) == len(boxes) and v[0][0] > 0 for f in per_dim for v in f[3]):
                x = [[lengths_of(window, v, d) for v in f[3]] for d, f in enumerate(per_dim)]
                found = self.built[key] = self._ask(per_dim, x, boxes, shaped)
        if found is None:
            x = lengths()
            key = (shaped, None, *[(tuple(f[2]), tuple([(v[1], v[2]) for v in f[3]]), tuple(map(tuple, y)))
                                   for f, y in zip(per_dim, x, strict=True)])  # fmt: skip
            found = self.built.get(key)
            if found is None:
                found = self.built[key] = self._ask(per_dim, x, boxes, shaped)
        return found, boxes

    def _ask(self, *build) -> _Build:
        out = _Build(build)
        self.pending.append(out)
        return out

    def build(self, many) -> None:
        """Every build asked since the last: ``many(list of (per_dim, lengths, boxes, shaped))``
        gives their (rows, tiles, inverse) in order."""
        for pending, made in zip(self.pending, many([b.args for b in self.pending]), strict=True):
            pending.args, pending.made = None, made
        self.pending = []

    @staticmethod
    def rows(ticket: tuple) -> tuple:
        """(rows, tiles, the distinct row of each combination) of ``get``'s ticket, once built."""
        build, boxes = ticket
        rows, tiles, inverse = build.made
        if [i for i, _ in rows.inputs] != boxes[1:]:
            inputs = tuple(zip(boxes[1:], [n for _, n in rows.inputs], strict=True))
            rows = Rows(rows.numel, inputs, rows.padded, rows.extra, rows.outside, rows.copied)
        return rows, tiles, inverse


class _Build:
    """One build asked of ``RowShare``: its arguments until built, then what it made."""

    __slots__ = ("args", "made")

    def __init__(self, args: tuple) -> None:
        self.args, self.made = args, None
