"""Capture: torch.fx where it traces faithfully, else the model's own run recorded; every graph is
checked against the model, a wrong one detected and replaced, and its errors name the user's line."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from helpers import ClampSTE, assert_tiled_matches
from torch import nn

import bigpicture as bp
from bigpicture.engine import capture as g
from bigpicture.engine import check
from bigpicture.engine.check import checked_capture, mismatch

pytestmark = pytest.mark.usefixtures("one_thread")


def spec(*shape):
    return [(shape, torch.float64, torch.device("cpu"))]


def image(*shape):
    return torch.randn(shape, dtype=torch.float64)


class WrongBranch(nn.Module):
    """torch.fx takes the other branch (a Proxy is no Tensor) and still gives a graph of the same shapes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.out = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if torch.jit.isinstance(y, torch.Tensor):
            y = torch.relu(y)
        else:
            y = torch.sigmoid(y)
        return self.out(y)


def _targets(gm):
    return {n.target for n in gm.graph.nodes}


def test_a_wrong_fx_graph_of_the_right_shapes_is_detected_and_replaced():
    torch.manual_seed(0)
    model = WrongBranch().double().eval()
    traced = g.capture(model)
    assert torch.sigmoid in _targets(traced)  # the wrong capture, as torch.fx gives it
    gm = checked_capture(model, spec(1, 2, 12, 10))
    assert gm.meta["bigpicture_capture"] == "recorded"
    assert torch.relu in _targets(gm) and torch.sigmoid not in _targets(gm)
    assert any("torch.fx's graph computes other values" in p for p in gm.meta["bigpicture_checks"])
    assert_tiled_matches(model, image(1, 2, 12, 10), 4)


def test_a_wrong_graph_is_caught_on_a_small_probe_when_the_input_is_too_large_to_run(monkeypatch):
    model = WrongBranch().double().eval()
    monkeypatch.setattr(check, "PROBE_ELEMENTS", 200)  # the plan's input, 2 x 12 x 10, counts as large
    monkeypatch.setattr(check, "REDUCED_SIDE", 8)  # the probe's, 2 x 8 x 8, does not
    assert mismatch(g.capture(model), spec(1, 2, 12, 10), None, None) is None  # shapes agree on fake tensors
    assert "other values" in check._reduced_probe(g.capture(model), model, spec(1, 2, 12, 10))
    gm = checked_capture(model, spec(1, 2, 12, 10))
    assert gm.meta["bigpicture_capture"] == "recorded" and torch.sigmoid not in _targets(gm)


def test_monai_basic_unet_branch_is_detected_and_exact():
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    model = nets.BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 8, 4), norm="batch").double().eval()
    gm = checked_capture(model, spec(1, 1, 32, 32))
    assert gm.meta["bigpicture_capture"] == "recorded"
    (fx_problem,) = gm.meta["bigpicture_checks"]
    assert "torch.fx's graph fails where the model does not" in fx_problem and "basic_unet.py" in fx_problem
    assert_tiled_matches(model, image(1, 1, 32, 32), 8)


def test_when_every_capture_is_wrong_the_error_blames_the_capture(monkeypatch):
    model = WrongBranch().double().eval()
    wrong = g.capture(model)
    monkeypatch.setattr(check, "record", lambda m, inputs, real: (wrong, m(*real)))
    with pytest.raises(bp.TilingError) as e:
        bp.tiled(model, tile=4)(image(1, 2, 12, 10))
    message = str(e.value)
    assert "the capture is at fault, not the input" in message
    line = inspect.getsourcelines(WrongBranch.forward)[1] + 6  # the output whose values differ
    assert f'test_capture.py", line {line}' in message and "other values than the model" in message


class ShapeBranch(nn.Module):
    """Control flow on shapes and iteration over a tensor: torch.fx cannot trace either."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)])
        self.out = nn.Conv2d(4, 2, 3, padding=1)
        self.register_buffer("scale", torch.tensor([0.5, 2.0]).view(1, 2, 1, 1).double())

    def forward(self, x):
        if x.shape[-1] > 100:
            x = F.avg_pool2d(x, 2)
        parts = [conv(c) for conv, c in zip(self.convs, x.chunk(2, 1))]
        return self.out(torch.cat(parts, 1) * self.scale.repeat(1, 2, 1, 1))


@pytest.mark.parametrize("shape", [(1, 2, 12, 10), (2, 2, 9, 11)])
def test_what_fx_cannot_trace_is_recorded_with_the_users_own_parameters(shape):
    torch.manual_seed(0)
    model = ShapeBranch().double().eval()
    with pytest.raises(bp.TilingError):
        g.capture(model)
    gm = checked_capture(model, spec(*shape))
    owned = {id(t) for t in (*model.parameters(), *model.buffers())}
    assert {id(t) for t in (*gm.parameters(), *gm.buffers())} <= owned
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"convs.0", "convs.1", "out"}
    net = bp.tiled(model, tile=4)
    assert set(map(id, net.parameters())) == set(map(id, model.parameters()))
    model.zero_grad()
    net(image(*shape)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert_tiled_matches(model, image(*shape), 4)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            return y
        return -y


def test_control_flow_on_tensor_values_names_the_line():
    model = DataDependent().double().eval()
    line = inspect.getsourcelines(DataDependent.forward)[1] + 2
    for call in (lambda: bp.tiled(model, tile=4)(image(1, 1, 8, 8)), lambda: bp.make_plan(model, (1, 1, 8, 8))):
        with pytest.raises(bp.TilingError) as e:
            call()
        assert f'test_capture.py", line {line}' in str(e.value)
        assert "depends on the values of a tensor" in str(e.value)


class ShapeBranchSTE(ShapeBranch):
    def forward(self, x):
        return ClampSTE.apply(super().forward(x))


def test_recorded_custom_function_keeps_its_own_backward(monkeypatch):
    torch.manual_seed(0)
    model = ShapeBranchSTE().double().eval()
    gm = checked_capture(model, spec(1, 2, 12, 10))
    assert ClampSTE in [n.target for n in gm.graph.nodes if n.op == "call_function"]
    monkeypatch.setattr(bp.rules, "_RULES", dict(bp.rules._RULES))
    bp.register_pointwise(ClampSTE)
    assert_tiled_matches(model, image(1, 2, 12, 10), 4)  # the straight-through gradient, not clamp's


def test_a_model_that_fails_on_the_input_is_the_inputs_fault():
    model = ShapeBranch().double().eval()
    with pytest.raises(bp.TilingError) as e:
        bp.tiled(model, tile=4)(image(1, 1, 8, 8))  # one channel: two features where `out` takes four
    assert "at fault" not in str(e.value) and "node `mul`" in str(e.value) and "Check that the untiled" in str(e.value)
