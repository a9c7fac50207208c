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
