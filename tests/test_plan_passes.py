"""The planner's bounds over many passes: a squeeze-and-excitation network takes a pass per squeeze
(a global mean), each recomputing the network before it, so its passes share most nodes.

The time bound's tight level (``bound.pass_bounds``) and the memory bounds (``memory_bound``) ask
each node's steps once over its rows in every pass: the bounds must equal those of each pass on its
own, and the pruned search must still choose what predicting every candidate chooses.
"""

import pytest
import torch
import torch.nn.functional as F
from test_plan_search import DEVICES, _budgets, chosen
from test_planning_speed import calibrated
from torch import nn

from bigpicture.engine.tiles import Diagonal, layout
from bigpicture.perf import bound, predict
from bigpicture.perf.memory_bound import least_memories
from bigpicture.perf.predict import least_memory
from bigpicture.perf.schedule import analyse, candidates
from bigpicture.perf.walk import grads


@pytest.fixture(autouse=True)
def _calibration(tmp_path, monkeypatch, request):
    """This CPU uncalibrated, or calibrated with ``test_planning_speed.calibrated``'s table."""
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))
    table = {"ops": calibrated().ops}
    spec = getattr(request.node, "callspec", None)
    if "calibrated" in str(spec.params.get("device", "") if spec else ""):
        monkeypatch.setattr(predict, "load_calibration", lambda: table)


class Excite(nn.Module):
    """A residual block whose output is scaled per channel by its own global mean (a squeeze)."""

    def __init__(self, c: int, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=dilation, dilation=dilation)
        self.norm = nn.BatchNorm2d(c)
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)

    def forward(self, x):
        y = F.relu(self.norm(self.conv(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return x + y * s


def excite_net():
    """Four squeezes (five passes), at two resolutions."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), Excite(4), Excite(4, 2), nn.MaxPool2d(2), Excite(4), Excite(4, 3),
        nn.Conv2d(4, 2, 3, padding=1),
    )  # fmt: skip


SHAPE = (1, 1, 120, 104)


@pytest.fixture(scope="module")
def splits():
    torch.manual_seed(0)
    found = analyse(excite_net().eval(), SHAPE)
    assert len(found) == 5 and len(found[-1].order) > len(found[0].order)
    return found


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("device", list(DEVICES))
def test_the_tight_bound_of_all_passes_at_once_is_each_pass_alone(splits, device, training):
    dtype, dev = DEVICES[device], device.split()[0]
    rates = predict._setting(dev, dtype, None, {})[1]
    for tile in candidates(splits, SHAPE):
        items = []
        for s in splits:
            lay = layout(s, SHAPE, tile)
            items.append((s, lay, (bound.dim_tables(s, lay), grads(s, Diagonal(s, lay).row(0)[1], False))))
        together = bound.pass_bounds(items, dtype, rates, training)
        alone = [bound.pass_bound(*item[:2], dtype, rates, training, item[2]) for item in items]
        assert together == pytest.approx(alone, rel=1e-12), tile
        p = predict.predict_splits(splits, SHAPE, dtype, tile, dev, training)
        assert sum(together) <= p.time * (1 + 1e-9), tile
        assert bound.time_bound(splits, SHAPE, dtype, tile, dev, training, {}) == pytest.approx(sum(together))


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("device", ["cpu calibrated", "H100-SXM"])
def test_memory_bounds_of_all_passes_at_once_equal_one_walk_per_tile(splits, device, training):
    dtype, dev = DEVICES[device], device.split()[0]
    tiles = candidates(splits, SHAPE)
    together = least_memories(splits, SHAPE, dtype, tiles, dev, training, {})
    assert together == {t: least_memory(splits, SHAPE, dtype, t, dev, training) for t in tiles}
    # the candidates in batches, as the search asks for them, give the same bounds
    asked = {}
    for start, size in ((0, 1), (1, 2), (3, 4), (7, len(tiles))):
        asked |= least_memories(splits, SHAPE, dtype, tiles[::-1][start : start + size], dev, training, {})
    assert asked == together


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("device", list(DEVICES))
def test_the_pruned_search_of_many_passes_chooses_as_predicting_every_tile(splits, device, training):
    dtype = DEVICES[device]
    for budget in _budgets(splits, SHAPE, device, dtype, training):
        pruned, skipped, tried = chosen(splits, SHAPE, budget, device, dtype, training, False)
        every, _, all_tried = chosen(splits, SHAPE, budget, device, dtype, training, True)
        assert pruned == every, (budget, pruned.tile, every.tile)
        assert len(tried) + skipped <= len(all_tried)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("device", ["cpu calibrated", "L4"])
def test_memory_bounds_under_a_budget_are_exact_for_the_tiles_that_may_fit(splits, device, training):
    """Given a budget, a tile over it in the last pass keeps that pass's bound: over the budget,
    at most its whole bound; every other tile's bound is the whole one."""
    dtype, dev = DEVICES[device], device.split()[0]
    tiles = candidates(splits, SHAPE)
    whole = least_memories(splits, SHAPE, dtype, tiles, dev, training, {})
    for budget in sorted(set(whole.values())):
        given = least_memories(splits, SHAPE, dtype, tiles, dev, training, {}, budget)
        for t in tiles:
            if whole[t] <= budget:
                assert given[t] == whole[t], (budget, t)
            else:
                assert budget < given[t] <= whole[t], (budget, t)
