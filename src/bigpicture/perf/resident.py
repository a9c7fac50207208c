"""How much of the boundary tensors is resident on the CPU while the tiles of an inference run.

The dense sinks are allocated whole (``torch.empty``) but the OS backs their pages only as tiles
write them, in run order (row-major over the grid, the last dimension fastest):

    after the tile at grid index (i_0, ..., i_n-1), of a sink of spatial extent (S_0, ..., S_n-1):
        dimension 0: the rows before the tile's box, whole; in its box, as dimension 1 says, ...
        last dimension: the line up to the box's end, and part of the next page (a line written from
                        its start touches its pages; lines under a page apart share them)

Measured (RSS at each tile's start, unet2d at 768^2, tile 192, a 4.5 MiB output): 0.7, 2.5, 2.5, 2.4 |
2.6, 3.9, 4.0, 3.9 | ... MiB, one band of rows per row of tiles. So on the CPU an inference's peak is
the largest over the tiles, in run order, of its working set plus what is resident so far: a class
of tiles peaks at its last tile. GPUs allocate the whole tensor (``predict._memory`` counts it), and
so does training, whose backward runs after the forward wrote every tile.
"""

from __future__ import annotations

import math
import mmap

import numpy as np

from bigpicture.engine.held import is_hold
from bigpicture.engine.split import Split
from bigpicture.engine.tiles import Layout, write_box

PAGE_BYTES = mmap.PAGESIZE


def dense_sinks(split: Split) -> list:
    """The sinks assembled at full size (read by the untiled tail or returned); a stage cut's holds
    are counted apart (``stage_cost.with_cuts``), reductions' sinks stream (small)."""
    dense = [k for k in split.sinks if any(split.roles.get(u) in ("tail", "output") for u in k.users)]
    return [k for k in dense if not any(is_hold(u) for u in k.users)]


def boundary_bytes(split: Split, item: int) -> int:
    """Bytes of the dense sinks, whole."""
    return sum(math.prod(split.shapes[k]) for k in dense_sinks(split)) * item


def resident_bytes(split: Split, lay: Layout, index: tuple[int, ...], item: int) -> int:
    """Bytes of the dense sinks resident once the tiles up to grid ``index`` (run order) wrote theirs."""
    per_dim = [[(j,)] for j in index]
    return int(_resident(split, lay, per_dim, item).reshape(-1)[0])


def class_resident(split: Split, lay: Layout, lasts: tuple[tuple[int, ...], ...], item: int) -> np.ndarray:
    """``resident_bytes`` at the last tile of each class of a separable grid (``grid.ClassGrid``:
    ``lasts[d]``, the last grid index along d of each kind), one entry per class, row-major as
    ``classes._Grid.mesh`` orders them."""
    return _resident(split, lay, [[(j,) for j in kinds] for kinds in lasts], item).reshape(-1)


def _resident(split: Split, lay: Layout, per_dim: list[list[tuple[int]]], item: int) -> np.ndarray:
    """The resident bytes at every combination of the grid indices ``per_dim[d]`` (an array of their
    counts' shape): per dimension, the rows before the tile's box whole, in it the next dimension's."""
    nd, total = split.nd, np.zeros(tuple(len(p) for p in per_dim), dtype=np.int64)
    for k in dense_sinks(split):
        extent, planes = split.extents[k], math.prod(split.shapes[k][:2])
        bounds = [np.array([_interval(lay, split.strides[k], extent, d, j) for (j,) in per_dim[d]],
                           dtype=np.int64).reshape(-1, 2) for d in range(nd)]  # fmt: skip
        lo, hi = bounds[-1][:, 0], bounds[-1][:, 1]
        ends = np.where(hi > lo, hi, lo)  # a tile writing nothing here: the line up to its start
        line = np.minimum(extent[-1], ends + PAGE_BYTES // item)
        resident = np.where(ends > 0, line, 0)
        for d in range(nd - 2, -1, -1):
            lo, hi = bounds[d][:, 0], bounds[d][:, 1]
            whole = math.prod(extent[d + 1 :])
            resident = np.add.outer(lo * whole, np.zeros(resident.shape, dtype=np.int64)) + np.multiply.outer(
                hi - lo, resident
            )
        total = total + planes * item * resident
    return total


def _interval(lay: Layout, stride, extent, d: int, j: int) -> tuple[int, int]:
    """The interval along d of a sink's box that tile index j writes (``tiles.write_box``)."""
    box = write_box((j,) * len(extent), lay, stride, extent)
    return box.lo[d], box.hi[d]
