"""Max pooling with indices and max unpooling (SegNet, MONAI's Quicknat) in 1D, 2D and 3D: tiled
equals untiled in float64, outputs, indices and every gradient, on grids with tiles at every border
and in the interior, with ties (the zeros after a ReLU, upsampled plateaus) where the first maximum
of a window decides where the unpooled value and its gradient go."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_tiled_matches
from test_errors import expect_error
from test_rules_channels import SHAPES
from test_rules_spatial import Around
from torch import nn

POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
UNPOOL = {1: nn.MaxUnpool1d, 2: nn.MaxUnpool2d, 3: nn.MaxUnpool3d}
F_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
F_UNPOOL = {1: F.max_unpool1d, 2: F.max_unpool2d, 3: F.max_unpool3d}


class PoolUnpool(nn.Module):
    """relu -> pool (indices) -> conv -> unpool to the pool's input size: a SegNet level."""

    def __init__(self, nd, k, s, p=0):
        super().__init__()
        self.pool = POOL[nd](k, s, p, return_indices=True)
        self.unpool = UNPOOL[nd](k, s, p)
        self.mid = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1](4, 4, 3, padding=1)

    def forward(self, y):
        y = torch.relu(y)
        v, i = self.pool(y)
        return self.unpool(self.mid(v), i, output_size=y.shape[2:]) + y


def functional(y, nd, **kw):
    """F.max_pool*d(return_indices=True) and F.max_unpool*d; ``kw``: the pool's dilation, ceil_mode."""
    y = torch.relu(y)
    v, i = F_POOL[nd](y, 2, 2, return_indices=True, **kw)
    return F_UNPOOL[nd](torch.tanh(v), i, 2, 2, output_size=y.shape[2:])


def plateaus(y, nd):
    """Nearest upsampling makes 2-wide plateaus: overlapping windows hold ties of nonzero gradient."""
    up = F.interpolate(y, scale_factor=2)
    v, i = F_POOL[nd](up, 3, 2, 1, return_indices=True)
    return F_UNPOOL[nd](v * v, i, 3, 2, 1, output_size=up.shape[2:])[(Ellipsis,) + (slice(None, None, 2),) * nd]


# name: (kernel, stride, padding) of PoolUnpool, or fn(y, nd); y: the (N, 4, *S) output of a convolution
CASES = {
    "module_k2": (2, 2, 0),
    "module_overlapping_k3_s2_p1": (3, 2, 1),
    "functional_k2": lambda y, nd: functional(y, nd),
    "functional_ceil_mode": lambda y, nd: functional(y, nd, ceil_mode=True),
    "functional_dilation_2_ceil": lambda y, nd: functional(y, nd, dilation=2, ceil_mode=True),
    "plateau_ties": plateaus,
}


def model(name, nd):
    case = CASES[name]
    if callable(case):
        return Around(case, nd).double()
    m = Around(lambda y, nd: m.layers(y), nd)
    m.layers = PoolUnpool(nd, *case)  # a submodule: its parameters' gradients are compared too
    return m.double()


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_pool_indices_and_unpool_tiled_equal_untiled(name, nd, one_thread):
    shape, tile = SHAPES[nd]
    torch.manual_seed(0)
    net = assert_tiled_matches(model(name, nd), torch.randn(shape, dtype=torch.float64), tile)
    assert len(net.plan.tiles) >= 2**nd and "tail" not in net.plan.split.roles.values()


class Indices(nn.Module):
    """The pool's indices as an output, next to the values: the image's flat positions."""

    def __init__(self, nd):
        super().__init__()
        self.conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1](3, 4, 3, padding=1)
        self.pool = POOL[nd](3, 2, 1, return_indices=True)

    def forward(self, x):
        v, i = self.pool(torch.relu(self.conv(x)))
        return v, i.to(v.dtype)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_pool_indices_are_the_untiled_positions(nd, one_thread):
    shape, tile = SHAPES[nd]
    torch.manual_seed(0)
    assert_tiled_matches(Indices(nd).double(), torch.randn(shape, dtype=torch.float64), tile)


def test_unpool_of_indices_not_from_a_pool_is_a_clear_error():
    def fn(y, nd):
        v, _ = F.max_pool2d(y, 2, return_indices=True)
        fake = torch.zeros_like(v, dtype=torch.int64)
        return F.max_unpool2d(v, fake, 2, output_size=y.shape[2:])

    expect_error(Around(fn, 2).double(), torch.randn(1, 3, 12, 12, dtype=torch.float64), 4,
                 "F.max_unpool2d", "do not come straight from a max pool")  # fmt: skip


def test_unpool_to_another_size_than_the_pool_input_is_a_clear_error():
    def fn(y, nd):
        v, i = F.max_pool2d(y, 2, return_indices=True)  # 12 -> 6; unpooled to 13: other positions
        return F.max_unpool2d(v, i, 2, output_size=(13, 13))[:, :, :12, :12]

    expect_error(Around(fn, 2).double(), torch.randn(1, 3, 12, 12, dtype=torch.float64), 4,
                 "F.max_unpool2d", "output_size=")  # fmt: skip
