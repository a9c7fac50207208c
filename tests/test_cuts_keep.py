"""Earlier passes that keep their last tile's graph from the forward to the backward
(``Plan.keep_graph``, ``PerPass(..., keep=)``; ``perf/cuts.kept_graphs`` chooses it in training when
all the passes' predicted peaks fit the budget): the backward does not recompute those tiles, and
outputs, parameter gradients and input gradients still equal the untiled model's in float64."""

from __future__ import annotations

import pytest
import torch
from helpers import _compare, _loss
from test_cuts import CASES, Classifier, UNet, _model

import bigpicture as bp
from bigpicture.engine import execute
from bigpicture.engine.plan import PerPass, capture, plan_splits, requested_tiles, split_graph

# name: (model, input shape, tile of each pass, cuts)
KEEP = {
    "2d_classifier_two_cuts": (Classifier, (1, 2, 32, 32), [(8, 8), (16, 16), (32, 32)], ["layer1", "layer2"]),
    "2d_unet_frontier_whole_later": (UNet, (1, 2, 24, 24), [(8, 8), (24, 24), (24, 24)], ["enc", "mid"]),
    "2d_unet_one_cut_same_tiles": (UNet, (1, 2, 24, 20), [(8, 8), (8, 8)], ["mid"]),
    "3d_unet_frontier": (lambda: UNet(nd=3), (1, 2, 12, 12, 12), [(4, 4, 4), (12, 12, 12), (8, 8, 8)], ["enc", "mid"]),
}  # fmt: skip


def _run_counted(monkeypatch, plan, model, x):
    runs = []
    tile = execute.Runner.run_tile
    monkeypatch.setattr(execute.Runner, "run_tile", lambda self, *a: runs.append(1) or tile(self, *a))
    got = execute.run(plan, (x,), list(model.parameters()), torch.device("cpu"))
    g = torch.autograd.grad(_loss(got), [x, *model.parameters()])
    return got, g, len(runs)


@pytest.mark.parametrize("name", KEEP)
def test_kept_graphs_of_earlier_passes_are_exact_and_not_recomputed(name, one_thread, monkeypatch):
    make, shape, tiles, cuts = KEEP[name]
    model = _model(make)
    inputs = [(shape, torch.float64, torch.device("cpu"))]
    splits = split_graph(capture(model, True, inputs), inputs, True, cuts)
    kept = plan_splits(splits, shape, torch.float64, PerPass(tiles, range(len(splits) - 1)))
    plain = plan_splits(splits, shape, torch.float64, PerPass(tiles))
    assert [p.keep_graph for p in (*kept.earlier, kept)] == [True] * len(kept.earlier) + [False]
    assert requested_tiles(kept).keep == set(range(len(splits) - 1)), "re-planning keeps the choice"
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64)
    x0 = x.clone().requires_grad_()
    expected = model(x0)
    g0 = torch.autograd.grad(_loss(expected), [x0, *model.parameters()])
    got, g1, runs = _run_counted(monkeypatch, kept, model, x.clone().requires_grad_())
    _compare(got, expected, "output")
    for a, b in zip(g1, g0):
        _compare(a, b, "gradient")
    _, _, runs_plain = _run_counted(monkeypatch, plain, model, x.clone().requires_grad_())
    assert runs == runs_plain - len(kept.earlier), "each earlier pass's last tile is not recomputed"


@pytest.mark.parametrize("name", ["2d_classifier_two_cuts", "2d_unet_frontier"])
def test_the_planner_keeps_earlier_graphs_in_training_when_they_fit(name, one_thread):
    from bigpicture.perf.cuts import kept_graphs
    from bigpicture.perf.devices import get_device

    make, shape, tile, cuts = CASES[name]
    model = _model(make)
    plan = bp.make_plan(model, shape, tile=tile, dtype=torch.float64, cuts=cuts, training=True)
    assert all(p.keep_graph for p in plan.earlier) and "keeps its last tile's graph" in plan.note, plan.note
    inputs = [(shape, torch.float64, torch.device("cpu"))]
    splits = split_graph(capture(model, True, inputs), inputs, True, cuts)
    cpu, t = get_device("cpu"), PerPass([(tile, tile)] * len(splits))
    fits, _ = kept_graphs(splits, shape, torch.float64, t, cpu, True, 2**40, "")
    assert fits.keep == set(range(len(splits) - 1))
    for training, limit in ((True, 1), (False, 2**40)):  # over the budget; inference (no backward)
        same, note = kept_graphs(splits, shape, torch.float64, t, cpu, training, limit, "n")
        assert same is t and note == "n"


def test_the_planners_kept_graphs_run_exact(one_thread):
    """bp.tiled with cuts in training, the planner keeping the graphs: the kept graphs' step equals the untiled one."""
    from test_cuts import _check

    model = _model(Classifier)
    net = _check(model, (1, 2, 32, 32), 8, ["layer1", "layer2"])
    assert net.plan.earlier and all(p.keep_graph for p in net.plan.earlier), net.plan.note


def test_more_cuts_keeps_a_candidate_only_where_it_lowers_the_predicted_time():
    """``Search.more``: with the later stages at their own tile, each other candidate is kept where
    the predicted time drops (a cut the one-tile search passed over), and nothing else is added."""
    from bigpicture.perf.cuts import Search

    times = {("b",): 1.0, ("b", "a"): 0.6, ("b", "a", "c"): 0.7, ("b", "a", "d", "e"): 0.5}
    search = object.__new__(Search)
    search.candidates = [("b",), ("a",), ("c",), ("d", "e")]
    search.evaluate = lambda names, tile, tiers=None: (
        (times[names], dict.fromkeys(names, tiers[0])) if names in times else None)
    tile = PerPass([(8, 8), (32, 32)])
    at, note = search.more({"b": "host"}, tile)
    assert at == dict.fromkeys(("b", "a", "d", "e"), "host") and "`a`, `d`, `e`" in note, note
    times[("b", "a")] = 1.5  # now no candidate helps
    times[("b", "a", "d", "e")] = 2.0
    times[("b", "c")], times[("b", "d", "e")] = 1.0, 1.1
    assert search.more({"b": "host"}, tile) is None
