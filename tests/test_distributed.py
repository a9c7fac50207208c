"""Tiles of one image across ranks (``bp.tiled(model, group=...)``): every rank's outputs and
gradients equal the untiled single-process ones. Spawned gloo processes on 127.0.0.1, float64."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_launch import launch
from helpers import _compare, _loss
from torch import nn

import bigpicture as bp
from bigpicture.engine.distributed import shares


class Classifier(nn.Module):
    """A streamed reduction (global average and max pooling) and a linear tail."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1)
        )
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        f = self.body(x)
        pooled = torch.cat([f.mean((2, 3)), torch.amax(f, dim=(2, 3))], 1)
        return self.head(pooled)


class UNet(nn.Module):
    """Down, up, skip connection: a dense output; the tail scales it (so it needs the gather)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(2, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.dec = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x):
        e = torch.relu(self.enc(x))
        u = self.up(torch.relu(self.down(e)))
        y = self.dec(torch.cat([e, u], 1))
        return y, y.flatten(2).sum(-1)


class Normed(nn.Module):
    """GroupNorm and InstanceNorm statistics: extra passes over the tiles (multipass=True)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(4, affine=True)

    def forward(self, x):
        return self.inorm(self.b(torch.relu(self.gn(self.a(x)))))


CASES = {  # name: (model, input shape, tile, multipass)
    "classifier": (Classifier, (2, 2, 20, 18), 8, False),
    "unet": (UNet, (1, 2, 16, 20), 8, False),
    "groupnorm": (Normed, (1, 2, 18, 16), 8, True),
}


def check_case(name: str, group=None, seed: int = 0) -> None:
    """On this rank: the tiled net over ``group`` against the untiled model, outputs and gradients."""
    make, shape, tile, multipass = CASES[name]
    torch.manual_seed(seed)
    model = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    x0, x1 = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = model(x0)
    params = list(model.parameters())
    g0 = torch.autograd.grad(_loss(expected), [x0] + params)
    net = bp.tiled(model, tile=tile, multipass=multipass, group=group or dist.group.WORLD)
    got = net(x1)
    assert len(net.plan.tiles) > dist.get_world_size(group), name  # every rank has tiles
    _compare(got, expected, f"{name} output")
    g1 = torch.autograd.grad(_loss(got), [x1] + params)
    names = ["input"] + [n for n, _ in model.named_parameters()]
    for what, a, b in zip(names, g1, g0):
        _compare(a, b, f"{name} gradient of {what}")
    assert len(net.report.ranks.seconds) == dist.get_world_size(group)


def tile_parallel(rank: int, world: int, names: list[str]) -> None:
    for name in names:
        check_case(name)


@pytest.mark.parametrize("world", [2, 3])
def test_tile_parallel_matches_untiled(world):
    launch(tile_parallel, world, list(CASES))


@pytest.mark.parametrize(
    "weights, ranks, expected",
    [
        ([1] * 9, 2, [(0, 4), (4, 9)]),
        ([1] * 9, 3, [(0, 3), (3, 6), (6, 9)]),
        ([5, 1, 1, 1, 1, 1], 2, [(0, 1), (1, 6)]),
        ([1, 1], 3, [(0, 1), (1, 1), (1, 2)]),
        ([], 2, [(0, 0), (0, 0)]),
    ],
)
def test_shares_are_contiguous_and_balanced(weights, ranks, expected):
    assert [(r.start, r.stop) for r in shares(weights, ranks)] == expected
