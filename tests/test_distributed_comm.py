"""What the ranks send: the performance model's list of collectives (``perf.comm.collectives``) equals
the collectives counted in the engine (``engine.collectives.counted``) for a classifier, a UNet and
a model with extra passes, on 2 and 3 spawned gloo ranks; the packed gathers carry values exactly;
the planner's tile is rank 0's on every rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_launch import launch
from helpers import _compare, _loss
from test_distributed import CASES
from torch import nn

import bigpicture as bp
from bigpicture.engine.collectives import FIRST_SLOT, counted, pack, unpack
from bigpicture.errors import TilingError
from bigpicture.perf.comm import collectives

KINDS = {
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "all_reduce": "all_reduce",
}


def _sent(calls) -> list[tuple[str, int]]:
    return [(KINDS.get(name, name), nbytes) for name, nbytes, _ in calls]


class Wide(nn.Module):
    """A streamed reduction over 300 channels: its partial results (4.8 kB) outgrow the first slot."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 300, 3, padding=1)
        self.head = nn.Linear(300, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


MODELS = {**CASES, "wide": (Wide, (2, 2, 16, 16), 8, False)}


def counted_steps(rank: int, world: int, names: list[str]) -> None:
    """Two steps per model: the second sends exactly the model's collectives; the first, also the
    broadcast of each pass's shares (and a second gather round where the results outgrow the slot)."""
    for name in names:
        make, shape, tile, multipass = MODELS[name]
        torch.manual_seed(0)
        model = make().double()
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        expected = torch.autograd.grad(_loss(model(x)), [x, *model.parameters()], allow_unused=True)
        net = bp.tiled(model, tile=tile, multipass=multipass, group=dist.group.WORLD)
        steps = []
        for _ in range(2):
            with counted() as calls:
                got = torch.autograd.grad(_loss(net(x)), [x, *model.parameters()], allow_unused=True)
            steps.append(_sent(calls))
            for a, b in zip(got, expected):
                assert (a is None) == (b is None), name
                if b is not None:
                    _compare(a, b, f"{name} gradient on {world} ranks")
        model_calls = [(c.kind, c.nbytes) for c in collectives(net.plan, world, input_grad=True)]
        assert steps[1] == model_calls, (name, world, steps[1], model_calls)
        passes = 1 + len(net.plan.earlier)
        first = [c for c in steps[0] if c[0] != "broadcast"]
        assert len(steps[0]) - len(first) == passes, (name, steps[0])  # each pass's shares, once
        if name == "wide":  # 4.8 kB of means: a first round of FIRST_SLOT bytes, then larger slots
            assert (
                first[:2] == [("all_gather", FIRST_SLOT), ("all_gather", 8192)] and first[2:] == steps[1][1:]
            )
        else:
            assert first == steps[1], (name, steps[0])


@pytest.mark.parametrize("world", [2, 3])
def test_the_model_counts_what_the_engine_sends(world):
    launch(counted_steps, world, list(MODELS))


def test_one_rank_or_one_tile_sends_nothing():
    plan = bp.make_plan(CASES["classifier"][0]().double(), (2, 2, 20, 18), tile=8, training=True)
    assert collectives(plan, 1) == []
    assert collectives(bp.make_plan(CASES["classifier"][0]().double(), (2, 2, 20, 18), tile=32), 2) == []


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(([(torch.randn(2, 6, 1, 1, dtype=torch.float64), None, 3)], (0.25, {0: torch.bfloat16})),
                     id="partials"),
        pytest.param((torch.randn(5, dtype=torch.bfloat16), torch.arange(4), torch.tensor(True)), id="dtypes"),
        pytest.param((torch.randn(4, 6)[:, ::2], torch.randn(3)[1:]), id="strided"),
        pytest.param((torch.empty(0, 3), torch.tensor(2.5), [], {}), id="empty"),
        pytest.param({"a": [torch.full((2,), float("nan")), torch.tensor([-0.0, float("inf")])]}, id="special"),
    ],
)  # fmt: skip
def test_pack_round_trip_is_exact(obj):
    back = unpack(pack(obj))
    flat, flat_back = _leaves(obj), _leaves(back)
    assert len(flat) == len(flat_back)
    for a, b in zip(flat, flat_back):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(_bytes(a), _bytes(b))  # bit for bit: NaN, -0.0 and bfloat16 too
        else:
            assert a == b


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def _leaves(o) -> list:
    if isinstance(o, (list, tuple)):
        return [type(o).__name__] + [x for v in o for x in _leaves(v)]
    if isinstance(o, dict):
        return [sorted(o)] + [x for v in o.values() for x in _leaves(v)]
    return [o.contiguous() if isinstance(o, torch.Tensor) else o]


def planner_tile_from_rank_zero(rank: int, world: int) -> None:
    """Rank 1 never chooses (its planner would fail); it takes rank 0's tile; then a budget no tile
    fits fails on every rank, rank 1 naming rank 0's error, and neither waits for the other."""
    import bigpicture.tiled as tiled

    if rank == 1:

        def refuse(*args, **kwargs):
            raise AssertionError("only rank 0 chooses the tile")

        tiled.best_tile = refuse
    torch.manual_seed(0)
    model = CASES["classifier"][0]().double()
    x = torch.randn(2, 2, 20, 18, dtype=torch.float64)
    net = bp.tiled(model, memory="64MiB", group=dist.group.WORLD)
    with torch.no_grad():
        _compare(net(x), model(x), "output with the planner's tile")
    tiles = [None] * world
    dist.all_gather_object(tiles, net.plan.tile)
    assert tiles == [net.plan.tile] * world and "fastest predicted" in net.plan.note
    with pytest.raises(
        TilingError, match="no tile fits" if rank == 0 else "rank 0 could not choose the tile"
    ):
        with torch.no_grad():
            bp.tiled(model, memory="1KiB", group=dist.group.WORLD)(x)


def test_ranks_take_rank_zeros_planner_tile():
    launch(planner_tile_from_rank_zero, 2)
