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


def check_case(name: str, group=None, seed: int = 0, cases: dict = CASES) -> None:
    """On this rank: the tiled net over ``group`` against the untiled model, outputs and gradients."""
    make, shape, tile, multipass = cases[name]
    torch.manual_seed(seed)
    model = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    x0, x1 = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = model(x0)
    params = list(model.parameters())
    g0 = torch.autograd.grad(_loss(expected), [x0] + params, allow_unused=True)  # unused: None
    net = bp.tiled(model, tile=tile, multipass=multipass, group=group or dist.group.WORLD)
    got = net(x1)
    assert len(net.plan.tiles) > dist.get_world_size(group), name  # every rank has tiles
    _compare(got, expected, f"{name} output")
    g1 = torch.autograd.grad(_loss(got), [x1] + params, allow_unused=True)
    names = ["input"] + [n for n, _ in model.named_parameters()]
    for what, a, b in zip(names, g1, g0):
        assert (a is None) == (b is None), f"{name} gradient of {what}: {a} against {b}"
        if b is not None:
            _compare(a, b, f"{name} gradient of {what}")
    assert sum(g is not None for g in g0) > len(params) // 2, name  # most parameters are used
    assert len(net.report.ranks.seconds) == dist.get_world_size(group) and net.report.ranks.imbalance >= 1


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


def _untiled_gradients(name: str, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean over ``images`` of the untiled model's parameter gradients, one image per step."""
    make = CASES[name][0]
    torch.manual_seed(0)
    model = make().double()
    total = None
    for x in images:
        grads = torch.autograd.grad(_loss(model(x)), list(model.parameters()))
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return [t / len(images) for t in total]


def _image(name: str, index: int) -> torch.Tensor:
    return torch.randn(
        CASES[name][1], dtype=torch.float64, generator=torch.Generator().manual_seed(100 + index)
    )


def _data_parallel_step(name: str, image: int, images: int, tile_group, data_group) -> None:
    """One DDP step of the tiled net on image ``image``: DDP's gradient is the images' mean."""
    make, _, tile, multipass = CASES[name]
    torch.manual_seed(0)
    model = make().double()
    net = bp.tiled(model, tile=tile, multipass=multipass, group=tile_group)
    ddp = torch.nn.parallel.DistributedDataParallel(net, process_group=data_group)
    x = _image(name, image)
    _loss(ddp(x)).backward()
    expected = _untiled_gradients(name, [_image(name, i) for i in range(images)])
    for (what, p), e in zip(model.named_parameters(), expected):
        _compare(p.grad, e, f"{name} data-parallel gradient of {what}")


def data_parallel(rank: int, world: int, name: str) -> None:
    _data_parallel_step(name, rank, world, None, dist.group.WORLD)


def data_and_tile_parallel(rank: int, world: int, name: str) -> None:
    """2 images x 2 tile ranks on a (data, tile) device mesh of 4 processes."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data", "tile"))
    image = mesh.get_local_rank("data")
    _data_parallel_step(name, image, 2, mesh.get_group("tile"), mesh.get_group("data"))


@pytest.mark.parametrize(
    "name, world", [("classifier", 2), pytest.param("groupnorm", 3, marks=pytest.mark.slow)]
)
def test_ddp_averages_untiled_gradients(name, world):
    launch(data_parallel, world, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet"])
def test_two_images_by_two_tile_ranks(name):
    launch(data_and_tile_parallel, 4, name)
