"""The diagonals of several passes walked at once (``intervals.needs_many``).

A squeeze-and-excitation network's plan has one pass per block (17-51), each recomputing the
network from its input to that block: nested prefixes of one graph, sharing their ops, each with
its own boxes. Walking each pass's diagonal (``tiles.Diagonal``) costs a few numpy calls per node
and pass; walked together, the union's nodes are walked once over every pass's rows, side by side.
Each diagonal gets the blocks its first ask walks (the two border blocks: ``Diagonal.starts(0)``),
the same blocks it would walk alone (each row's boxes depend on that row alone).
"""

from __future__ import annotations

import numpy as np

from bigpicture.engine import intervals
from bigpicture.engine.tiles import Diagonal

MAX_COLUMNS = 512  # rows walked at once: wider, the walk's numpy calls cost per row more than per call


def walk_together(diagonals: list[Diagonal]) -> None:
    """Walk the first blocks of those of ``diagonals`` with none walked yet, a few at once (up to
    ``MAX_COLUMNS`` rows); what ``intervals.needs_many`` cannot walk together is left to walk alone."""
    todo, batch, size = [d for d in diagonals if not d._blocks], [], 0
    for diagonal in todo:
        starts = diagonal.starts(0)
        rows = len(starts) * diagonal.BLOCK
        if batch and size + rows > MAX_COLUMNS:
            _walk(batch)
            batch, size = [], 0
        batch.append((diagonal, starts))
        size += rows
    if len(batch) > 1:
        _walk(batch)


def _walk(batch: list[tuple[Diagonal, list[int]]]) -> None:
    """One ``needs_many`` walk of the blocks from each diagonal's starts, split into its blocks."""
    made = [d.rows_of(starts) for d, starts in batch]
    splits = [d.split for d, _ in batch]
    writes = [dict(zip(s.sinks, w, strict=True)) for s, (_, w) in zip(splits, made, strict=True)]
    rows = [r for r, _ in made]
    need = intervals.needs_many(splits, writes, rows)
    if need is None:
        return
    nd, total = splits[0].nd, sum(rows)
    union = list(need)
    at = {n: i for i, n in enumerate(union)}
    zero = np.zeros((1, nd, total), dtype=np.int64)  # the box of a node in none of the passes
    lo = np.concatenate([np.stack([need[n][0] for n in union]), zero])
    hi = np.concatenate([np.stack([need[n][1] for n in union]), zero])
    for (diagonal, starts), (_, w), c in zip(batch, made, intervals.columns(rows), strict=True):
        s = diagonal.split
        nodes = [n for n in reversed(s.order) if s.roles[n] == "spatial"]
        nodes += [] if s.input in nodes else [s.input]
        index = [at.get(n, len(union)) for n in nodes]
        blo = np.concatenate([np.stack([a for a, _ in w]), lo[:, :, c][index]]) if w else lo[:, :, c][index]
        bhi = np.concatenate([np.stack([b for _, b in w]), hi[:, :, c][index]]) if w else hi[:, :, c][index]
        diagonal._blocks.update(zip(starts, diagonal.blocks_of(starts, len(w), nodes, blo, bhi), strict=True))
