"""A plan's check of its tiles (``Plan.lint``: write boxes partition every sink, read boxes lie in the
image) runs once, when a run first uses the plan, not when the planner makes it: making a plan walks
none of its grid's diagonal, and every run still checks the plan before its first tile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bigpicture as bp
from bigpicture.engine.plan import Plan


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)).double()


def test_making_a_plan_walks_no_diagonal_row():
    plan = bp.make_plan(_model(), (1, 2, 40, 36), tile=8)
    assert plan.tiles.diagonal.rows == {} and not plan.__dict__.get("_linted")
    plan.lint()
    assert len(plan.tiles.diagonal.rows) == max(plan.grid) and plan.__dict__["_linted"]


@pytest.mark.parametrize("training", [False, True])
def test_every_run_checks_its_plan_before_the_first_tile(training, monkeypatch, one_thread):
    model, x = _model(), torch.randn(1, 2, 24, 20, dtype=torch.float64)
    net = bp.tiled(model, tile=8)

    def broken(self):
        raise AssertionError("the plan's tiles do not partition the output")

    monkeypatch.setattr(Plan, "_lint", broken)
    with pytest.raises(AssertionError, match="partition"), torch.set_grad_enabled(training):
        net(x)
    monkeypatch.undo()
    with torch.set_grad_enabled(training):
        torch.testing.assert_close(net(x), model(x))
    assert net.plan.__dict__["_linted"]


def test_a_streamed_run_checks_its_plan(tmp_path, monkeypatch, one_thread):
    model, x = _model(), torch.randn(1, 2, 24, 20, dtype=torch.float64)
    net = bp.tiled(model, tile=8)
    calls = []
    monkeypatch.setattr(Plan, "_lint", lambda self: calls.append(self))
    with torch.no_grad():
        net(x)
    assert len(calls) == 1
