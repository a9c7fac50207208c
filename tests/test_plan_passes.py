"""The planner's bounds over many passes: a squeeze-and-excitation network takes a pass per squeeze
(a global mean), each recomputing the network before it, so its passes share most nodes.

The time bound's tight level (``bound.pass_bounds``) and the memory bounds (``memory_bound``) ask
each node's steps once over its rows in every pass: the bounds must equal those of each pass on its
own, and the pruned search must still choose what predicting every candidate chooses.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from test_plan_search import DEVICES, _budgets, chosen
from test_planning_speed import calibrated
from torch import nn

from bigpicture.engine.tiles import Diagonal, layout
from bigpicture.errors import TilingError
from bigpicture.perf import bound, predict
from bigpicture.perf import search as search_module
from bigpicture.perf.devices import get_device
from bigpicture.perf.memory_bound import least_memories
from bigpicture.perf.predict import _size, least_memory
from bigpicture.perf.schedule import _side, analyse, best_tile, candidates, least_time
from bigpicture.perf.search import search
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
def test_memory_bounds_of_some_passes_are_the_largest_of_theirs(splits, device, training):
    """The search bounds the last pass first, the others later: the larger of the two is the
    bound of every pass, and each is the largest of its passes' own."""
    dtype, dev = DEVICES[device], device.split()[0]
    tiles, last = candidates(splits, SHAPE), len(splits) - 1
    whole = least_memories(splits, SHAPE, dtype, tiles, dev, training, {})
    alone = [least_memories(splits, SHAPE, dtype, tiles, dev, training, {}, [k]) for k in range(len(splits))]
    shared: dict = {}  # as the search asks: the last pass of every tile, then the others of one
    ends = least_memories(splits, SHAPE, dtype, tiles, dev, training, shared, [last])
    for t in tiles:
        others = least_memories(splits, SHAPE, dtype, [t], dev, training, shared, range(last))[t]
        assert max(ends[t], others) == whole[t] == max(a[t] for a in alone), t
        assert ends[t] == alone[last][t] and others == max(a[t] for a in alone[:last]), t
    assert least_memories(splits, SHAPE, dtype, tiles, dev, training, {}, []) == dict.fromkeys(tiles, 0)


# -- the search over many passes against bounding and predicting every candidate -----------------------


class Excite3d(nn.Module):
    """``Excite`` in 3D: a residual block scaled per channel by its own global mean."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.fc = nn.Conv3d(c, c, 3, padding=1), nn.Conv3d(c, c, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return x + y * torch.sigmoid(self.fc(y.mean((2, 3, 4), keepdim=True)))


NETS = {  # name: (network, input shape)
    "2d": (excite_net, SHAPE),
    "3d": (lambda: nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), Excite3d(2), nn.MaxPool3d(2), Excite3d(2),
                                 nn.Conv3d(2, 1, 3, padding=1)), (1, 1, 24, 20, 28)),  # fmt: skip
}


def every_tile(splits, shape, dtype, dev, training):
    """Brute force: each candidate's memory bound over the last pass and over every pass, and its
    prediction (every pass, every class of tiles)."""
    tiles = candidates(splits, shape)
    last = least_memories(splits, shape, dtype, tiles, dev, training, {}, [len(splits) - 1])
    whole = least_memories(splits, shape, dtype, tiles, dev, training, {})
    return tiles, last, whole, {t: predict.predict_splits(splits, shape, dtype, t, dev, training) for t in tiles}


def fastest(predictions):
    """The planner's choice among predictions that fit: the least time, then the larger tile."""
    return min(predictions, key=lambda p: (p.time, -math.prod(p.tile)))


def budgets(last, whole, peaks):
    """Budgets just under each tile's bounds and peak: the tile over the budget in the last pass, or
    under it there but over it in another, or bounded under it but predicted over it; at its peak."""
    return sorted({v for t in whole for v in (last[t] - 1, whole[t] - 1, peaks[t].memory - 1, peaks[t].memory)})


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("device", ["cpu calibrated", "H100-SXM"])
@pytest.mark.parametrize("net", list(NETS))
def test_the_search_over_passes_equals_bounding_and_predicting_every_tile(net, device, training):
    """The search bounds the last pass alone and the others only for a tile it predicted over the
    budget: it predicts the tiles the bound of every pass leaves under the budget (exhaustive), each
    as predicted alone, keeps a bound of each visited tile over the budget iff the whole bound is,
    and chooses what predicting every candidate chooses; where none fits, the error names the least
    peak of every candidate."""
    factory, shape = NETS[net]
    torch.manual_seed(0)
    splits, dtype, dev = analyse(factory().eval(), shape), DEVICES[device], device.split()[0]
    assert len(splits) > 2
    tiles, last, whole, peaks = every_tile(splits, shape, dtype, dev, training)
    for budget in budgets(last, whole, peaks):
        for exhaustive in (True, False):
            tried, bounds, *_ = search(splits, shape, tiles, budget, get_device(dev), dtype, training,
                                       least_time, exhaustive)  # fmt: skip
            predicted = {p.tile: p for p in tried}
            if exhaustive:  # every tile visited but those slower by their number of tiles alone
                assert set(predicted) == {t for t in bounds if whole[t] <= budget}, budget
            assert all(p == peaks[t] for t, p in predicted.items()), budget
            for t, b in bounds.items():
                assert last[t] <= b <= whole[t] and (b <= budget) == (whole[t] <= budget), (budget, t)
                assert b <= budget or b in (last[t], whole[t]), (budget, t)
        fits = [p for p in peaks.values() if p.memory <= budget]
        if fits:  # the pruned search's choice, as best_tile makes it
            assert fastest(p for p in tried if p.memory <= budget) == fastest(fits), budget
            continue
        with pytest.raises(TilingError) as error:
            best_tile(splits, shape, budget, dev, dtype, training)
        least = min(p.memory for p in peaks.values())
        said = re.search(r"smallest predicted peak is (.*), with tile ([0-9 x]+) \((.*)\)\. Give", str(error.value))
        assert said[1] == _size(least), (budget, str(error.value))
        named = [p for p in peaks.values() if p.memory == least and _side(p.tile) == said[2]]
        assert named and said[3] == ", ".join(f"{k} {_size(v)}" for k, v in named[0].memory_parts if v)


@pytest.mark.parametrize("net", ["2d", "3d"])
def test_the_budgets_above_reach_every_case(net):
    """Not vacuous: some tile's last pass fits a budget its other passes do not, and some tile's
    bound of every pass fits a budget its prediction does not."""
    factory, shape = NETS[net]
    torch.manual_seed(0)
    splits = analyse(factory().eval(), shape)
    tiles, last, whole, peaks = every_tile(splits, shape, torch.float32, "cpu", False)
    cases = budgets(last, whole, peaks)
    assert any(last[t] <= b < whole[t] for b in cases for t in tiles)
    assert any(whole[t] <= b < peaks[t].memory for b in cases for t in tiles)


@pytest.mark.parametrize("which", ["least peak", "largest"])
def test_a_tile_too_many_kinds_of_tiles_to_predict_is_bounded_over_every_pass(splits, which, monkeypatch):
    """A candidate whose prediction is a ``TilingError`` (``grid._listed``) under the last pass's
    bound: the search raises its error, when nothing else fits, only if the bound of every pass fits
    too, and chooses among the others as predicting every candidate does."""
    tiles, last, whole, peaks = every_tile(splits, SHAPE, torch.float32, "cpu", True)
    real = search_module.predict_splits
    unknown = min(tiles, key=lambda t: peaks[t].memory) if which == "least peak" else tiles[-1]

    def unpredictable(*args, **kwargs):
        if args[3] == unknown:
            raise TilingError("too many kinds of tiles")
        return real(*args, **kwargs)

    monkeypatch.setattr(search_module, "predict_splits", unpredictable)
    dev, raised = get_device("cpu"), 0
    for budget in budgets(last, whole, peaks):
        fits = [p for t, p in peaks.items() if t != unknown and p.memory <= budget]
        if not fits and whole[unknown] <= budget:
            with pytest.raises(TilingError, match="kinds of tiles"):
                search(splits, SHAPE, tiles, budget, dev, torch.float32, True, least_time)
            raised += 1
            continue
        tried, bounds, *_ = search(splits, SHAPE, tiles, budget, dev, torch.float32, True, least_time)
        assert unknown not in {p.tile for p in tried}
        if unknown in bounds:  # visited: over the budget in the last pass, or bounded over every pass
            assert bounds[unknown] == (whole[unknown] if last[unknown] <= budget else last[unknown])
        if fits:
            got = best_tile(splits, SHAPE, budget, "cpu", torch.float32, True)
            assert got == fastest(fits).with_note(got.note)
    assert (raised > 0) == (which == "least peak")
