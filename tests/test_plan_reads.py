"""The plan's read boxes, found through the grid's diagonal, equal the per-tile walk of every case."""

from __future__ import annotations

import pytest
import torch
from test_exact import CASES

import bigpicture as bp


@pytest.mark.parametrize("name", sorted(CASES))
def test_read_boxes_equal_the_walk_of_each_tile(name):
    factory, shape, tile = CASES[name]
    plan = bp.make_plan(factory(), shape, tile=tile, dtype=torch.float64)
    for p in (*plan.earlier, plan):
        for t in p.tiles:
            assert t.read == p.needs(t)[p.split.input], (t.index, t.read)
