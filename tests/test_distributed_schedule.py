"""The scheduler for several ranks: tiles weighed by predicted cost, contiguous balanced shares."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bigpicture as bp
from bigpicture.engine.distributed import RankTimes, shares
from bigpicture.perf.multi import tile_costs


def _plan(shape, tile, training=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    return bp.make_plan(model, shape, tile=tile, device="cpu", training=training)


@pytest.mark.parametrize("training", [False, True])
def test_tile_costs_follow_tile_size(training):
    plan = _plan((1, 3, 56, 52), 16, training)  # a 4 x 4 grid; the last row and column are remainders
    costs = tile_costs(plan)
    assert len(costs) == len(plan.tiles) and min(costs) > 0
    by_index = dict(zip((t.index for t in plan.tiles), costs))
    assert by_index[(3, 3)] < by_index[(0, 0)]  # 8 x 4 px against 16 x 16 px
    interior = {by_index[i] for i in [(1, 1), (1, 2), (2, 1), (2, 2)]}
    assert len(interior) == 1  # one geometry, one cost


def test_training_costs_more_than_inference():
    assert sum(tile_costs(_plan((1, 3, 32, 32), 16, True))) > sum(tile_costs(_plan((1, 3, 32, 32), 16)))


def test_shares_balance_predicted_cost():
    plan = _plan((1, 3, 64, 40), 16)
    costs = tile_costs(plan)
    for ranks in (2, 3, 4):
        parts = shares(costs, ranks)
        assert [i for r in parts for i in r] == list(range(len(costs)))  # contiguous, each tile once
        loads = [sum(costs[i] for i in r) for r in parts]
        assert max(loads) - min(loads) <= max(costs) + 1e-12


def test_rank_times_imbalance():
    times = RankTimes()
    times.add([1.0, 3.0])
    times.add([1.0, 1.0])
    assert times.seconds == [2.0, 4.0] and times.imbalance == pytest.approx(4 / 3)
    assert "imbalance (slowest / mean) 1.33" in str(times)


def test_group_without_torch_distributed_is_a_clear_error():
    from bigpicture.engine.distributed import Team

    with pytest.raises(bp.TilingError, match="init_process_group"):
        Team(object())


@pytest.mark.parametrize("shape, tile", [((1, 3, 56, 52), 16), ((1, 3, 150, 40), 8)])
def test_tile_costs_by_kind_equal_a_walk_of_every_tile(shape, tile):
    """``tile_costs`` walks one tile per kind (per-dimension grid keys); each tile's own walk agrees."""
    from bigpicture.perf.devices import load_calibration
    from bigpicture.perf.predict import resolve_device
    from bigpicture.perf.rates import Rates
    from bigpicture.perf.walk import walk

    plan = _plan(shape, tile, training=True)
    rates = Rates(resolve_device(plan.device), plan.dtype, load_calibration())
    expected = []
    for t in plan.tiles:
        w = walk(plan.split, plan.needs(t), t.writes, plan.dtype, rates, True)
        expected.append(2 * w.fwd_s + w.bwd_s + w.nodes * rates.train_node_s)
    assert tile_costs(plan) == pytest.approx(expected, rel=1e-12)
