"""Every node's geometry columns over a grid's kinds made at once (``kind_columns.node_columns``, from
the blocks' arrays) equal those made node by node from each kind's row of geometries, as
``classes._Grid.geometry_features`` made them before (``old_columns``, verbatim), over named networks
(squeeze-and-excitation passes, strided, transposed and padded convolutions, 2D and 3D) and random ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from split_checks import split_tests
from test_pass_batch import _monai

from bigpicture.perf import grid
from bigpicture.perf.classes import _Grid
from bigpicture.perf.grid import class_grid, layout
from bigpicture.perf.kind_columns import node_columns
from bigpicture.perf.schedule import analyse


@pytest.fixture(autouse=True)
def _uncalibrated(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))


def old_columns(g: _Grid, node, copy: bool) -> list[tuple]:
    """``_Grid.geometry_features`` as it was: each kind's row of geometries, then ``_column`` per dimension."""
    gs = [[g.geometry(j, copy) for j in reps] for reps in g.reps]
    out = []
    for d, row in enumerate(gs):
        values = [r[node][d] for r in row]
        ids: dict = {}
        firsts, tiles = [], []
        index = []
        for j, n, value in zip(g.reps[d], g._counts[d], values, strict=True):
            f = ids.setdefault(value, len(ids))
            if f == len(firsts):
                firsts.append(j), tiles.append(0)
            tiles[f] += n
            index.append(f)
        out.append((tuple(index), firsts, tiles, list(ids)))
    return out


def _typed(columns: list[tuple]) -> list:
    """The columns with each value's field types, which equality alone does not compare (True == 1)."""
    return [(c, [tuple(map(type, v)) for v in c[3]]) for c in columns]


def check(split, shape, tile) -> int:
    """The fast columns against the old ones on every node of ``split``'s class grid; 1 if compared."""
    grid._CLASSES.clear(), grid._DIAGONALS.clear()
    cg = class_grid(split, layout(split, shape, tile))
    if not cg.separable:
        return 0
    g = _Grid(split, cg)
    compared = 0
    for copy in (True, False):
        fast = node_columns(cg.geometry, g.reps, g._counts, copy)
        if fast is None:
            continue
        nodes = [n for n in g.row(0)[1] if n in split.ops]
        assert set(fast) == set(nodes)
        for node in nodes:
            assert _typed(fast[node]) == _typed(old_columns(g, node, copy)), (node, copy)
            assert g.geometry_features(node, copy) == old_columns(g, node, copy)
        compared = 1
    return compared


test_named_networks, test_senet_passes, test_random_architectures_2d, test_random_architectures_3d = (
    split_tests(check)
)


@pytest.mark.parametrize("tile", [8, (16, 40)])
def test_hash_collisions_fall_back_exactly(tile, monkeypatch):
    """Every row hashed alike (zero weights): the columns made the exact way (``unique_rows.unique_rows``)
    equal the old ones."""
    from bigpicture.perf import kind_columns

    monkeypatch.setattr(kind_columns, "_weights", lambda columns: np.zeros(columns, dtype=np.int64))
    shape = (1, 1, 416, 352)
    torch.manual_seed(0)
    splits = analyse(_monai("SEResNet50", 2, in_channels=1, num_classes=2)().eval(), shape)
    assert sum(check(split, shape, tile) for split in splits[:3]) == 3


def test_a_network_of_no_nodes():
    """A blueprint of no layers (hypothesis found it: ``_values`` of no kinds read its first row)."""
    from test_random_architectures import Blueprint

    blueprint = Blueprint(nd=3, input_shape=(1, 1, 5, 5, 5), nodes=[], dense=(0,), reduce=None, tile=(2, 2, 2), seed=0)
    for split in analyse(blueprint.build().float(), blueprint.input_shape):
        check(split, blueprint.input_shape, blueprint.tile)
