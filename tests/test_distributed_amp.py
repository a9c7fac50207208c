"""Tiles across ranks under ``torch.autocast`` (CPU, bfloat16, gloo): every rank's outputs have the
dtypes of the untiled run's, and outputs and gradients are within the rounding ``test_autocast``
allows, also where a rank has no tile of a sink (it must make its zeros in autocast's dtype, or
the sum all-reduce of the dense outputs mixes dtypes)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_launch import launch
from test_autocast import _assert_within_rounding, _step
from test_distributed import CASES

import bigpicture as bp

AMP = {  # name: (case, input shape, tile, ranks): 2 tiles on 3 ranks leave one rank without any
    "unet_rank_without_tiles": ("unet", (1, 2, 16, 8), 8, 3),
    "classifier_rank_without_tiles": ("classifier", (1, 2, 8, 16), 8, 3),
    "unet_every_rank": ("unet", (1, 2, 16, 24), 8, 2),
}


def amp_cases(rank: int, world: int, names: list[str]) -> None:
    for name in names:
        amp_case(name, world)


def amp_case(name: str, world: int) -> None:
    case, shape, tile, _ = AMP[name]
    make = CASES[case][0]
    torch.manual_seed(0)
    model = make()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    net = bp.tiled(model, tile=tile, group=dist.group.WORLD)
    y0, g0, x0 = _step(lambda v: _first(model(v)), model, x, torch.bfloat16)
    y1, g1, x1 = _step(lambda v: _first(net(v)), model, x, torch.bfloat16)
    tiles = len(net.plan.tiles)
    assert y1.dtype == y0.dtype == torch.bfloat16, (y1.dtype, y0.dtype)
    if name.endswith("without_tiles"):
        assert len(net.plan.tiles) < world  # some rank computed no tile
    for a, b in zip([y1, x1, *g1], [y0, x0, *g0]):
        assert a.dtype == b.dtype
        _assert_within_rounding(a.float(), b.float(), tiles, torch.bfloat16)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


@pytest.mark.parametrize("world", [2, 3])
def test_tile_parallel_under_autocast(world):
    launch(amp_cases, world, [name for name, case in AMP.items() if case[3] == world])
