"""The performance model's compiled mode (``perf/compiled.py``): fused memory-bound chains charged once."""

from __future__ import annotations

import torch
from torch import nn

import bigpicture as bp


class _Block(nn.Module):
    """conv -> bn -> relu, plus a residual add: bn heads a chain, relu and add follow it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x))) + x


def _model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Block(), _Block(), nn.Conv2d(8, 2, 1)).eval()


def _kinds(plan) -> dict:
    return dict(plan.prediction.by_kind)


def test_followers_fused_heads_and_convs_unchanged():
    """On an H100: relu follows bn (unary, free), the residual add follows relu (binary: a third of
    its traffic, the other operand's read); norms head their chains and convolutions are library
    calls, so both cost what they cost eagerly."""
    shape = (1, 3, 4096, 4096)
    eager = bp.make_plan(_model(), shape, tile=1024, device="H100-SXM", dtype=torch.bfloat16)
    fused = bp.make_plan(_model(), shape, tile=1024, device="H100-SXM", dtype=torch.bfloat16, compile=True)
    assert fused.tile == eager.tile and len(fused.tiles) == len(eager.tiles)
    e, f = _kinds(eager), _kinds(fused)
    assert f["conv"] == e["conv"] and f["norm"] == e["norm"]
    assert f.get("unary", 0.0) == 0.0 < e["unary"]
    torch.testing.assert_close(f["binary"], e["binary"] / 3, rtol=1e-9, atol=0)
    assert fused.time < eager.time
    assert "compiled tiles" in str(fused.prediction.note)


def test_training_and_earlier_passes_predicted_compiled():
    """A training step with train-mode BatchNorm (extra passes): every pass is predicted compiled."""
    model = _model().train()
    shape = (1, 3, 2048, 2048)
    eager = bp.make_plan(model, shape, tile=512, device="A100-40GB", training=True)
    fused = bp.make_plan(model, shape, tile=512, device="A100-40GB", training=True, compile=True)
    assert fused.earlier and len(fused.earlier) == len(eager.earlier)
    assert fused.time < eager.time
    assert fused.memory == eager.memory  # fusion changes traffic, not what a tile holds


def test_tiled_compile_plan_is_predicted_compiled():
    net = bp.tiled(_model(), tile=32, compile=True)
    plan = net.plan_for(torch.zeros(1, 3, 64, 64), training=False)
    assert "compiled tiles" in str(plan.prediction.note)
