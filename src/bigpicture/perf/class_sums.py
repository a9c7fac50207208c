"""A separable class grid's sums (``classes.aggregate``): each node's steps over the classes added
up, the grid's last tile's walk and every class's peaks, from each node's steps on arrays with the
class index of each (``classes._node_rows``).

A node's box per class (its values' bytes in the walks) is its steps' rows' positions read off per
class: ``classes._node_rows`` counted them, the same products of per-dimension lengths the grid's
kinds give (``classes._Grid.mesh``), so only the image's box is counted here.
"""

from __future__ import annotations

import math

import numpy as np

from bigpicture.perf.grid import ClassGrid
from bigpicture.perf.rates import Rates
from bigpicture.perf.resident import class_resident
from bigpicture.perf.walk import TileWalk, accumulation_s, bytes_of, readers, row_peaks


def summed(cg: ClassGrid, grid, grad: dict, combos: dict, item: int, rates: Rates, training: bool,
           input_copy: bool) -> TileWalk:  # fmt: skip
    """``classes.aggregate`` of a separable grid (``classes._Grid``) from each node's (steps, tiles,
    class index, positions of its box per step)."""
    split = grid.split
    total, steps, numels = TileWalk(), {}, {}
    for node, (st, tiles, index, numel) in combos.items():
        total.add_steps(st, tiles, training and grad[node])
        steps[node], numels[node] = (st, index), numel
    if training:
        for i, r in readers([st for st, _ in steps.values()], grad):
            tiles, positions = grid.numels(i)
            total.add_accumulation(
                float(tiles @ accumulation_s(bytes_of(split, i, positions, item), r, rates))
            )
    if training:
        total.last = last_walk(cg, steps, grad)
    peaks, peaks_train = class_peaks(split, grid, steps, numels, grad, item, training, input_copy)
    total.peak, total.peak_train = int(peaks.max()), int(peaks_train.max())
    if not rates.gpu and cg.lasts:  # the CPU backs the boundary's pages as tiles write them
        resident = class_resident(split, cg.lay, cg.lasts, item)
        peaks = np.broadcast_to(peaks, resident.shape)
        worst = int(np.argmax(peaks + resident))
        total.run_peak = int(peaks[worst]), int(resident[worst])
    return total


def last_walk(cg: ClassGrid, steps: dict, grad: dict) -> TileWalk:
    """The walk (times and counts) of the grid's last tile with work, as ``walk.walk`` sums it node by
    node, from the steps of its class: in each dimension, the kind of its last index with work."""
    picks = [lasts.index(w - 1) for lasts, w in zip(cg.lasts, cg.diagonal.working, strict=True)]
    kinds = [len(k) for k in cg.per_dim]
    at = sum(k * math.prod(kinds[d + 1 :]) for d, k in enumerate(picks))  # its class, row-major
    out = TileWalk()
    for node, (st, index) in steps.items():
        out.add_row(st, int(index[at]), grad[node])
    return out


def class_peaks(split, grid, steps: dict, numels: dict, grad: dict, item: int, training: bool,
                input_copy: bool):  # fmt: skip
    """The (inference, training) peak of each class: one walk per structure, on arrays. ``numels``:
    per node with a step, the positions of its box on each of its steps' rows (``walk.row_peaks``
    reads them off per class)."""
    sizes = {n: bytes_of(split, n, numels[n] if n in numels else grid.mesh(grid.lengths(n)), item)
             for n in grad}  # fmt: skip
    terms = [bytes_of(split, k, grid.mesh(write_lengths(grid, i)), item) for i, k in enumerate(split.sinks)]
    st, index = zip(*steps.values()) if steps else ((), ())
    return row_peaks(split, list(st), sizes, terms, grad, training, input_copy, list(index))


def write_lengths(grid, k: int) -> list[np.ndarray]:
    """Per dimension, each kind's length of sink k's write box (the block's box k)."""
    return [np.array(v, dtype=np.int64) for v in grid.box_lengths(lambda block: k)]
