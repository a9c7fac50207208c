"""The nodes' strides grouped by value, per dimension, in integers: what the grid's period and the
shift of a tile moved by whole periods (``grid._periodic``, ``grid._shifted``) are computed from.

A network of a thousand nodes has a handful of distinct strides (1, 2, 4, ... input pixels per
node pixel). Moving a tile by ``period`` tiles of ``tile`` pixels moves a node of stride p/q by
period * tile * q / p of its pixels, a whole number or not: computed once per distinct stride in
integers, and read per box through the group index of each node, not per node with ``Fraction``
arithmetic (whose hash and equality the planner paid a thousand times per pair of rows compared).
"""

from __future__ import annotations

import math

import numpy as np

from bigpicture.engine.split import Split
from bigpicture.engine.tiles import Block


class Strides:
    """Per dimension d: ``values[d]``, the distinct strides as (numerator, denominator) in lowest
    terms, and ``group[d]``, each node's index among them."""

    def __init__(self, split: Split) -> None:
        self.values, self.group = [], []
        pairs = [(node, _pairs(stride)) for node, stride in split.strides.items()]
        for d in range(split.nd):
            index: dict = {}
            group = {}
            for node, per_dim in pairs:
                group[node] = index.setdefault(per_dim[d], len(index))
            self.values.append(list(index))
            self.group.append(group)

    def period(self, tile: int, d: int) -> int:
        """The least number of tiles along d that moves every node by whole pixels: the lcm of the
        denominators of tile / stride (p / gcd(tile q, p) for a stride p/q)."""
        return math.lcm(*[p // math.gcd(tile * q, p) for p, q in self.values[d]])

    def shifts(self, moved: int, d: int) -> tuple[np.ndarray, np.ndarray]:
        """Per distinct stride along d, the node pixels ``moved`` input pixels make, and whether
        that is a whole number (where not, the shift is 0)."""
        whole = [moved * q % p == 0 for p, q in self.values[d]]
        shift = [moved * q // p if w else 0 for (p, q), w in zip(self.values[d], whole, strict=True)]
        return np.array(shift, dtype=np.int64), np.array(whole, dtype=bool)

    def of_block(self, block: Block, sinks, d: int) -> np.ndarray:
        """The group index of each of ``block``'s boxes along d (the sinks' write boxes, then its
        nodes'), cached on the block (of this split): the blocks of a diagonal are compared pair by pair."""
        key = ("strides", d)
        if key not in block.cache:
            group = self.group[d]
            block.cache[key] = np.array([group[n] for n in (*sinks, *block.nodes)], dtype=np.int64)
        return block.cache[key]


def _pairs(stride: tuple) -> tuple:
    """A node's stride per dimension as (numerator, denominator) pairs, cached by the stride's tuple:
    the passes of a network share their nodes' tuples (a deep network's 51 passes ask 600 each)."""
    found = _PAIRS.get(id(stride))
    if found is None or found[0] is not stride:
        if len(_PAIRS) >= 16384:
            _PAIRS.pop(next(iter(_PAIRS)))
        found = _PAIRS[id(stride)] = (stride, tuple((f.numerator, f.denominator) for f in stride))  # kept
    return found[1]


_PAIRS: dict = {}


def strides_of(split: Split) -> Strides:
    """The split's ``Strides``, cached by split."""
    key = id(split)
    if key not in _STRIDES or _STRIDES[key][0] is not split:
        if len(_STRIDES) >= 128:
            _STRIDES.pop(next(iter(_STRIDES)))
        _STRIDES[key] = (split, Strides(split))  # the split is kept, so its id is not reused while cached
    return _STRIDES[key][1]


_STRIDES: dict = {}
