"""The functional norms (``F.group_norm``, ``F.instance_norm``, ``F.batch_norm(training=True)``) in
the middle of a network, exact by the extra pass their modules get: outputs, parameter and input
gradients in 1D, 2D and 3D, and the running statistics they update equal the untiled model's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import _compare, _loss, assert_tiled_matches
from test_rules_channels import CONV, SHAPES
from torch import nn

import bigpicture as bp

# name: fn(y, module) on the (N, 4, *S) output of a convolution
CASES = {
    "group_norm": lambda y, m: F.group_norm(y, 2, m.w, m.b),
    "group_norm_keywords_no_affine": lambda y, m: F.group_norm(y, num_groups=4, eps=1e-3),
    "instance_norm": lambda y, m: F.instance_norm(y, weight=m.w, bias=m.b),
    "instance_norm_running_stats": lambda y, m: F.instance_norm(y, m.rm, m.rv, m.w, m.b, use_input_stats=False),
    "batch_norm_training": lambda y, m: F.batch_norm(y, None, None, m.w, m.b, training=True),
}
# norms that update running statistics: each run moves the buffers (and the untiled backward
# needs them unmoved), so tiled and untiled run on copies of the model
TRACKING = {
    "instance_norm_tracking_running_stats": lambda y, m: F.instance_norm(y, m.rm, m.rv, m.w, m.b, True, 0.2),
    "batch_norm_training_running_stats": lambda y, m: F.batch_norm(y, m.rm, m.rv, m.w, m.b, True, 0.3, 1e-4),
}


class Norm(nn.Module):
    """conv -> a functional norm -> relu -> conv, with the norm's affine parameters and buffers."""

    def __init__(self, fn, nd):
        super().__init__()
        self.fn = fn
        self.a, self.c = CONV[nd](3, 4, 3, padding=1), CONV[nd](4, 2, 3, padding=1)
        self.w, self.b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.register_buffer("rm", torch.randn(4) * 0.1)
        self.register_buffer("rv", torch.rand(4) + 0.5)

    def forward(self, x):
        return self.c(torch.relu(self.fn(self.a(x), self)))


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_functional_norm_tiled_equals_untiled(name, nd, one_thread):
    shape, tile = SHAPES[nd]
    torch.manual_seed(0)
    net = assert_tiled_matches(Norm(CASES[name], nd).double(), torch.randn(shape, dtype=torch.float64), tile)
    assert len(net.plan.tiles) >= 3**nd
    assert bool(net.plan.earlier) == (name != "instance_norm_running_stats")  # that one is pointwise


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(TRACKING))
def test_functional_norm_updates_running_stats_as_untiled(name, nd, one_thread):
    shape, tile = SHAPES[nd]
    torch.manual_seed(0)
    untiled = Norm(TRACKING[name], nd).double()
    model = copy.deepcopy(untiled)
    before = untiled.rm.clone()
    x0, x1 = (torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
              for _ in range(2))  # fmt: skip
    expected, got = untiled(x0), bp.tiled(model, tile=tile)(x1)
    _compare(got, expected, "output")
    _loss(expected).backward()
    _loss(got).backward()
    _compare(x1.grad, x0.grad, "input gradient")
    for (what, p), q in zip(model.named_parameters(), untiled.parameters()):
        _compare(p.grad, q.grad, f"gradient of {what}")
    assert not torch.equal(untiled.rm, before)  # the buffers moved, once
    _compare(model.rm, untiled.rm, "running mean")
    _compare(model.rv, untiled.rv, "running var")


def test_functional_norm_with_one_pass_is_a_clear_error():
    model = Norm(CASES["group_norm"], 2).double()
    with pytest.raises(bp.TilingError, match="multipass=False"):
        bp.tiled(model, tile=5, multipass=False)(torch.randn(SHAPES[2][0], dtype=torch.float64))


class InstanceNormTracking(nn.Module):
    """conv -> nn.InstanceNorm(track_running_stats=True) in train mode -> relu -> conv."""

    def __init__(self, nd, momentum):
        super().__init__()
        norm = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[nd]
        self.a, self.c = CONV[nd](3, 4, 3, padding=1), CONV[nd](4, 2, 3, padding=1)
        self.norm = norm(4, affine=True, track_running_stats=True, momentum=momentum)

    def forward(self, x):
        return self.c(torch.relu(self.norm(self.a(x))))


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("momentum", [0.2, None])
def test_instance_norm_module_in_train_mode_updates_its_buffers_as_untiled(nd, momentum, one_thread):
    shape, tile = SHAPES[nd]
    torch.manual_seed(0)
    untiled = InstanceNormTracking(nd, momentum).double().train()
    model = copy.deepcopy(untiled)
    x = torch.randn((2,) + tuple(shape[1:]), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected, got = untiled(x), bp.tiled(model, tile=tile)(x.clone())
    _compare(got, expected, "output")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        _compare(getattr(model.norm, name), getattr(untiled.norm, name), name)
    if momentum is not None:
        assert not torch.equal(untiled.norm.running_mean, torch.zeros(4, dtype=torch.float64))
