"""A box's length per kind read off the diagonal's blocks (``classes._Grid.box_lengths``, for the class
sums' positions, sizes and loss terms) equals what each kind's row of ``Box`` objects gives, as
``_Grid.numels``, ``lengths`` and ``class_sums.write_lengths`` read it before: every node's box and
every sink's write box, over named networks (squeeze-and-excitation passes, strided, transposed and
padded convolutions, 2D and 3D) and random ones; ``numels`` against the old one field by field."""

from __future__ import annotations

import numpy as np
import pytest
from split_checks import split_tests

from bigpicture.perf import class_sums, grid
from bigpicture.perf.classes import _Grid, _outer
from bigpicture.perf.grid import class_grid, layout


@pytest.fixture(autouse=True)
def _uncalibrated(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))


def old_numels(g: _Grid, node) -> tuple[np.ndarray, np.ndarray]:
    """``_Grid.numels`` as it was (at 93d0848), verbatim but for ``g``."""
    per_dim = g.features(lambda j, d: g.row(j)[1][node].length(d))  # the values are the lengths
    tiles = _outer([np.array(f[2], dtype=np.float64) for f in per_dim], np.multiply)
    numels = _outer([np.array(f[3], dtype=np.int64) for f in per_dim], np.multiply)
    return tiles, numels


def check(split, shape, tile) -> int:
    """Every box's lengths of ``split``'s class grid, new against old; 1 if compared."""
    grid._CLASSES.clear(), grid._DIAGONALS.clear()
    cg = class_grid(split, layout(split, shape, tile))
    if not cg.separable:
        return 0
    g = _Grid(split, cg)
    for node in g.row(0)[1]:
        want = [[g.row(j)[1][node].length(d) for j in reps] for d, reps in enumerate(g.reps)]
        assert g.box_lengths(lambda block, node=node: block.place[node]) == want, node
        assert all(np.array_equal(a, np.array(w, dtype=np.int64)) for a, w in zip(g.lengths(node), want))
        for new, old in zip(g.numels(node), old_numels(g, node), strict=True):
            assert new.dtype == old.dtype and new.shape == old.shape and np.array_equal(new, old), node
    for k in range(len(split.sinks)):
        want = [
            np.array([g.row(j)[0][k].length(d) for j in reps], dtype=np.int64)
            for d, reps in enumerate(g.reps)
        ]
        got = class_sums.write_lengths(g, k)
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got, want, strict=True)), k
    return 1


test_named_networks, test_senet_passes, test_random_architectures_2d, test_random_architectures_3d = (
    split_tests(check)
)
