"""``bigpicture infer --memory``: the planner's tile for a forward under a budget; and
``inference.run`` called directly plans inference, even with gradients enabled."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bigpicture as bp
from bigpicture import cli
from bigpicture.cli.infer import add_infer_command
from bigpicture.engine.inference import run
from bigpicture.perf.predict import predict_splits
from bigpicture.perf.schedule import analyse

zarr = pytest.importorskip("zarr")
TESTS = Path(__file__).parent
SHAPE = (1, 3, 64, 64)


@pytest.fixture(autouse=True)
def _uncalibrated(tmp_path, monkeypatch, one_thread):
    # nominal CPU rates: the planner's choices must not depend on this machine's calibration
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))


def seg():
    """A small dense network (no stride): its output equals the untiled one for any tile."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1)
    )


def budget_for_several_tiles(model, training: bool) -> int:
    """A budget that the 16 px tile fits and the whole image does not."""
    splits = analyse(model, SHAPE)
    small, whole = (predict_splits(splits, SHAPE, torch.float32, t, "cpu", training).memory for t in (16, 64))
    assert small < whole
    return (small + whole) // 2


@pytest.fixture
def files(tmp_path):
    """The arguments every ``infer`` call here shares: input, output, model and its weights."""
    (tmp_path / "model.py").write_text(
        f"import sys; sys.path.insert(0, {str(TESTS)!r})\nfrom test_infer_memory import seg as factory\n"
    )
    torch.save(seg().state_dict(), tmp_path / "w.pt")
    x = np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    args = [str(tmp_path / "x.npy"), "--out", str(tmp_path / "y.zarr"), "--model",
            f"{tmp_path / 'model.py'}:factory", "--weights", str(tmp_path / "w.pt"), "--quiet"]  # fmt: skip
    return x, args


def infer(*args) -> int:
    parser = argparse.ArgumentParser()
    add_infer_command(parser.add_subparsers())
    a = parser.parse_args(["infer", *args])
    return a.run(a)


def test_infer_with_memory_runs_the_planners_tile(tmp_path, files, capsys):
    x, args = files
    budget = budget_for_several_tiles(seg().eval(), training=False)
    memory = f"{budget / 1024:.2f} KiB"  # a size as the planner's messages write them
    assert infer(*args, "--memory", memory) == 0
    expected = bp.tiled(seg().eval(), memory=memory).plan_for(torch.zeros(SHAPE), training=False)
    assert not expected.training and 1 < len(expected.tiles) and expected.memory <= budget
    printed = capsys.readouterr().out.splitlines()
    tile = " x ".join(map(str, expected.tile))
    assert printed[0] == f"bigpicture infer: tile {tile} ({expected.note})"
    assert "fastest predicted" in expected.note
    y = zarr.open_array(str(tmp_path / "y.zarr"), mode="r")
    assert tuple(y.attrs["bigpicture"]["meta"]["tile"]) == expected.tile  # the tile the run used
    with torch.no_grad():
        want = seg().eval()(torch.from_numpy(x).float())
    torch.testing.assert_close(torch.from_numpy(y[:]), want, rtol=1e-5, atol=1e-4)
    # a larger budget, a larger tile: the budget is what chooses it
    assert infer(*args, "--memory", str(10 * budget), "--overwrite") == 0
    assert f"tile {tile} " not in capsys.readouterr().out


def test_infer_with_no_tile_runs_the_planners_tile_for_the_devices_memory(tmp_path, files, capsys):
    """Neither --tile nor --memory: the planner's tile for half of this machine's memory, and the
    printed line says that is what happened (issue 13, the planner's tile by default)."""
    x, args = files
    assert infer(*args) == 0
    expected = bp.tiled(seg().eval()).plan_for(torch.zeros(SHAPE), training=False)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"bigpicture infer: tile {' x '.join(map(str, expected.tile))} ({expected.note})"
    assert "no tile= or memory= given: the planner's tile for half of this machine's" in expected.note
    y = zarr.open_array(str(tmp_path / "y.zarr"), mode="r")
    assert tuple(y.attrs["bigpicture"]["meta"]["tile"]) == expected.tile
    with torch.no_grad():
        want = seg().eval()(torch.from_numpy(x).float())
    torch.testing.assert_close(torch.from_numpy(y[:]), want, rtol=1e-5, atol=1e-4)


def test_infer_takes_memory_or_tile_not_both(files, capsys):
    _, args = files
    with pytest.raises(SystemExit) as e:
        infer(*args, "--tile", "16", "--memory", "8GiB")
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_infer_with_too_small_a_budget_says_so(tmp_path, files, capsys):
    """Through ``bigpicture.cli.main``: the planner's TilingError as a message, not a traceback."""
    _, args = files
    assert add_infer_command in cli.HOOKS  # `bigpicture infer` is a subcommand of the installed command
    assert cli.main(["infer", *args, "--memory", "1KiB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigpicture infer: error: no tile fits 1.00 KiB on cpu")
    assert "Give memory of at least" in err and "Traceback" not in err
    assert not (tmp_path / "y.zarr").exists()  # refused before opening the store
    assert cli.main(["infer", *args, "--memory", "8 lots"]) == 2
    assert "memory='8 lots' is not a size" in capsys.readouterr().err


def test_run_called_directly_plans_inference():
    """``inference.run`` outside ``torch.no_grad()``: a forward's tile, not a training step's."""
    model = seg().eval()
    assert all(p.requires_grad for p in model.parameters()) and torch.is_grad_enabled()
    # what a 48 px tile's forward needs: the whole image's forward does not fit, a 48 px training step neither
    budget = predict_splits(analyse(model, SHAPE), SHAPE, torch.float32, 48, "cpu", False).memory
    net = bp.tiled(model, memory=budget)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32))
    inference, training = (net.plan_for(x, training=t) for t in (False, True))
    assert inference.tile != training.tile  # the budget tells them apart
    got = run(net, x)
    assert (net.plan.tile, net.plan.training) == (inference.tile, False)
    assert net.plan is inference
    assert not got.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # the same plan as through Tiled.run
        net.run(x)
    assert net.plan is inference
