"""Tiles across ranks with a global stage (engine/stages.py): attention over all tokens runs untiled
on every rank between two passes, on the tokens the ranks' tiles gathered; the later pass's tiles
read its output box by box. Every rank's outputs and gradients equal the untiled model's (float64,
spawned gloo processes)."""

from __future__ import annotations

import functools

import pytest
import torch.distributed as dist
from distributed_launch import launch
from test_distributed import check_case
from test_stages import _model

STAGES = {  # name: (model, input shape, tile, multipass): a 3 x 3 grid (and a remainder)
    "attention_sdpa": (functools.partial(_model, dict(nd=2, attention="sdpa")), (1, 2, 24, 20), 8, True),
    "attention_mha_no_skip": (
        functools.partial(_model, dict(nd=2, attention="mha", skip=False)), (2, 2, 16, 24), 8, True,
    ),
}  # fmt: skip


def stage_parallel(rank: int, world: int, names: list[str]) -> None:
    from bigpicture.engine import distributed

    distributed.CHUNK_BYTES = 256  # dense sums in many pieces, as a sink larger than a GPU would be
    for name in names:
        check_case(name, cases=STAGES)
        assert len(_plan_passes(name)) == 2


def _plan_passes(name: str) -> list:
    import bigpicture as bp

    make, shape, tile, _ = STAGES[name]
    plan = bp.make_plan(make(), shape, tile=tile)
    return [*plan.earlier, plan]


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_tile_parallel_with_a_global_stage(world):
    launch(stage_parallel, world, list(STAGES))


def test_the_cases_hold_a_stage():
    assert all(len(_plan_passes(n)) == 2 for n in STAGES) and dist.is_available()


def cuts_from_rank_zero(rank: int, world: int) -> None:
    """With cuts and no tile, rank 1 never chooses (its search would fail): every rank runs rank 0's
    cuts and tiles, and outputs and gradients equal the untiled model's."""
    import torch
    from helpers import _compare, _loss
    from test_cuts import UNet
    from test_cuts import _model as cut_model

    import bigpicture as bp
    import bigpicture.perf.schedule as schedule
    from bigpicture.engine.plan import requested_tiles

    if rank == 1:

        def refuse(*args, **kwargs):
            raise AssertionError("only rank 0 chooses the cuts and tiles")

        schedule.cut_splits = refuse
    model = cut_model(UNet)
    torch.manual_seed(1)
    x = torch.randn(1, 2, 24, 20, dtype=torch.float64)
    for cuts in (["enc", "mid"], "auto"):
        net = bp.tiled(model, memory="2MiB", cuts=cuts, group=dist.group.WORLD)
        x0, x1 = x.clone().requires_grad_(), x.clone().requires_grad_()
        params = list(model.parameters())
        expected, got = model(x0), net(x1)
        _compare(got, expected, f"output, cuts={cuts}")
        for a, b in zip(torch.autograd.grad(_loss(got), [x1, *params]), torch.autograd.grad(_loss(expected), [x0, *params])):  # fmt: skip
            _compare(a, b, f"gradient, cuts={cuts}")
        passes = len(net.plan.earlier)
        seen = [None] * world
        dist.all_gather_object(seen, (requested_tiles(net.plan), passes, net.plan.note))
        assert seen == [seen[0]] * world and (passes == 2 or cuts == "auto"), seen


def test_ranks_take_rank_zeros_cuts_and_tiles():
    launch(cuts_from_rank_zero, 2)
