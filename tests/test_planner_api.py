"""The planner through the public API: ``bp.make_plan(..., device=, training=, memory=)`` and
``bp.tiled(model, memory=...)``."""

import re
import sys
import time

import pytest
import torch
from helpers import _compare, _loss
from torch import nn

import bigpicture as bp
from bigpicture.engine.plan import default_tile
from bigpicture.perf.devices import DEVICES, get_device
from bigpicture.perf.predict import _size, predict, predict_splits
from bigpicture.perf.schedule import analyse, choose_tile, default_budget, parse_memory
from bigpicture.tiled import planning_device

MiB = 2**20


@pytest.fixture(autouse=True)
def _uncalibrated(tmp_path, monkeypatch):
    # nominal CPU rates: predictions must not depend on this machine's calibration
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))


def cnn(dtype=torch.float32) -> nn.Module:
    """A small classifier: convolutions, pooling, a streamed global pooling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    ).to(dtype)


def segmenter(dtype=torch.float32) -> nn.Module:
    """Dense output, so that the boundary tensor is part of the peak."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 2, 3, padding=1),
    ).to(dtype)


def test_make_plan_for_a_gpu_on_a_whole_slide():
    start = time.perf_counter()
    p = bp.make_plan(
        cnn(), (1, 3, 100_000, 100_000), tile=4096, device="H100-SXM", dtype=torch.bfloat16, training=True
    )
    text = str(p)
    assert time.perf_counter() - start < 30
    assert p.memory > 0 and p.time > 0 and p.flops > 0 and p.prediction is p.prediction
    assert isinstance(p.prediction, bp.Prediction)
    assert p.memory == p.prediction.memory and p.time == p.prediction.time
    assert p.prediction.device == "H100-SXM" and p.prediction.training and p.training
    assert p.dtype == p.prediction.dtype == torch.bfloat16
    assert p.memory < DEVICES["H100-SXM"].memory_bytes
    assert "4096 x 4096" in text and _size(p.memory) in text and "25 x 25 = 625 tiles" in text
    for word in ("peak memory", "halo overhead", "recompute", "backward", "H100-SXM", "bfloat16"):
        assert word in text
    # the prediction is the one bp.predict makes for the plan, and training costs more than inference
    assert predict(p).memory == p.memory
    assert predict(p, training=False).time < p.time


def test_make_plan_stays_as_before_without_device_and_training():
    net = cnn(torch.float64)  # shapes come from the model's own dtype, whatever dtype is asked
    p = bp.make_plan(net, (1, 3, 64, 80), tile=32)
    assert p.tile == (32, 32) and len(p.tiles) == 6 and p.dtype == torch.float32
    assert not p.training and p.device.name == "cpu" and p.note == ""
    assert "prediction" not in p.__dict__  # computed on first use only
    assert p.prediction.device == "cpu" and not p.prediction.training
    assert bp.make_plan(net, (1, 3, 64, 80), dtype=torch.float64).tile == (64, 80)  # default 1024, capped


@pytest.mark.parametrize("name", ["H100", "TPU-v5"])
def test_unknown_device_lists_the_known_ones(name):
    with pytest.raises(bp.TilingError, match="Known devices") as e:
        bp.make_plan(cnn(), (1, 3, 256, 256), device=name)
    assert all(known in str(e.value) for known in DEVICES)
    if name == "H100":
        assert "Did you mean" in str(e.value) and "'H100-SXM'" in str(e.value)


def test_memory_picks_a_tile_that_fits():
    shape = (1, 3, 2048, 2048)
    whole = bp.make_plan(segmenter(), shape, tile=2048, device="A100-80GB", dtype=torch.bfloat16)
    assert whole.memory > 600 * MiB  # so the budget below needs tiles
    p = bp.make_plan(segmenter(), shape, device="A100-80GB", dtype=torch.bfloat16, memory="600MiB")
    assert p.memory <= 600 * MiB and p.tile < (2048, 2048)
    assert "planner" in str(p) and "fit 600.00 MiB" in str(p) and p.note in str(p)
    # the plan predicts what the planner said it would
    assert predict(p).memory == p.memory and predict(p).time == p.time
    auto = bp.make_plan(segmenter(), shape, tile="auto", device="A100-80GB", dtype=torch.bfloat16)
    assert auto.memory <= DEVICES["A100-80GB"].memory_bytes and auto.time <= p.time


def test_no_tile_fits_names_the_least_memory_that_would():
    shape = (1, 3, 128, 128)
    with pytest.raises(bp.TilingError, match="no tile fits") as e:
        bp.make_plan(segmenter(), shape, memory="1KiB", training=True)
    least = re.search(r"at least ([0-9.,]+ [KMG]?i?B)", str(e.value))[1]
    p = bp.make_plan(segmenter(), shape, memory=least, training=True)  # that much does fit
    assert p.memory <= parse_memory(least)
    net = bp.tiled(segmenter(), memory="1KiB")
    with pytest.raises(bp.TilingError, match=f"at least {re.escape(least)}"):
        net(torch.randn(shape))


def test_tile_and_memory_together_is_an_error():
    with pytest.raises(TypeError, match="give one"):
        bp.tiled(cnn(), tile=64, memory="1GiB")
    with pytest.raises(TypeError, match="give one"):
        bp.make_plan(cnn(), (1, 3, 64, 64), tile=64, memory="1GiB")
    with pytest.raises(bp.TilingError, match="not a size"):
        bp.tiled(cnn(), memory="a lot")


def _budget_for_several_tiles(net, shape, dtype, training) -> int:
    """A budget that the 16 px tile fits and the whole image does not."""
    splits = analyse(net, shape)
    small, whole = (predict_splits(splits, shape, dtype, t, "cpu", training).memory for t in (16, shape[2:]))
    assert small < whole
    return (small + whole) // 2


@pytest.mark.parametrize("make", [cnn, segmenter])
def test_tiled_with_memory_equals_the_untiled_model(make):
    torch.manual_seed(0)
    model = make(torch.float64)
    shape = (1, 3, 48, 40)
    budget = _budget_for_several_tiles(model, shape, torch.float64, training=True)
    net = bp.tiled(model, memory=budget)
    x = torch.randn(shape, dtype=torch.float64)
    x0, x1 = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, got = model(x0), net(x1)
    plan = net.plan
    assert plan.training and len(plan.tiles) > 1 and plan.memory <= budget and "planner" in str(plan)
    assert plan.prediction.device == "cpu" and plan.prediction.dtype == torch.float64
    _compare(got, expected, "output")
    params = list(model.parameters())
    g0 = torch.autograd.grad(_loss(expected), [x0] + params)
    g1 = torch.autograd.grad(_loss(got), [x1] + params)
    names = ["input"] + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, g1, g0, strict=True):
        _compare(a, b, f"gradient of {name}")
    # without gradients the planner plans one forward, which needs less: a tile at least as large
    with torch.no_grad():
        _compare(net(x), expected.detach(), "output without gradients")
    assert not net.plan.training and net.plan.memory <= budget
    assert all(a >= b for a, b in zip(net.plan.tile, plan.tile))


def test_tiled_with_memory_plans_per_shape():
    model = segmenter(torch.float64).eval()
    budget = _budget_for_several_tiles(model, (1, 3, 64, 64), torch.float64, training=False)
    net = bp.tiled(model, memory=budget)
    with torch.no_grad():
        for shape in [(1, 3, 64, 64), (1, 3, 40, 96), (1, 3, 64, 64)]:
            x = torch.randn(shape, dtype=torch.float64)
            _compare(net(x), model(x), f"output for {shape}")
            assert net.plan.input_shape == shape and net.plan.memory <= budget
    assert len(net._plans) == 2  # the second 64 x 64 call reused the first plan
    assert net.plan_for(torch.empty(1, 3, 64, 64, dtype=torch.float64), training=False) is net.plan
    assert "memory=" in repr(net)


def test_tile_auto_budgets_the_whole_device():
    model = cnn(torch.float64).eval()
    net = bp.tiled(model, tile="auto")
    x = torch.randn(1, 3, 40, 56, dtype=torch.float64)
    _compare(net(x), model(x), "output")
    assert "fit" in net.plan.note and net.plan.memory <= planning_device(torch.device("cpu")).memory_bytes
    for p in model.parameters():
        p.requires_grad_(False)
    net(x)
    assert not net.plan.training  # nothing to differentiate
    net(x.requires_grad_())
    assert net.plan.training  # the input's gradient


def test_tiled_plans_show_their_prediction():
    model = cnn()
    net = bp.tiled(model, tile=32)
    net(torch.randn(1, 3, 64, 64))
    text = str(net.plan)
    assert "peak memory" in text and "predicted on" in text and "training step" in text
    assert net.plan.training and net.plan.memory > 0
    with torch.no_grad():
        net(torch.randn(1, 3, 64, 64))
    assert not net.plan.training and "inference" in str(net.plan)


def test_the_planner_needs_figures_for_the_models_device():
    assert planning_device(torch.device("cpu")).name == "cpu"
    with pytest.raises(bp.TilingError, match="give tile=|Give tile="):
        planning_device(torch.device("meta"))


def test_fixed_default_tile_follows_the_number_of_spatial_dimensions(monkeypatch):
    """Where the planner has no figures for the model's device, no tile means the fixed default."""
    tiled_module = sys.modules["bigpicture.tiled"]  # the module (bp.tiled is the function)

    def unknown(device):
        raise bp.TilingError(f"no figures for {device}")

    monkeypatch.setattr(tiled_module, "planning_device", unknown)
    conv3d = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU())
    plan = bp.tiled(conv3d).plan_for(torch.zeros(1, 1, 300, 300, 300))
    assert plan.tile == (128, 128, 128) == (default_tile(3),) * 3 and default_tile(2) == 1024
    assert "fixed default tile" in plan.note and "fixed default tile" in str(plan)
    with pytest.raises(bp.TilingError, match="no figures"):  # memory= needs the figures
        bp.tiled(conv3d, memory="1GiB").plan_for(torch.zeros(1, 1, 30, 30, 30))


@pytest.mark.parametrize("device", ["cpu", "H100-SXM"])
def test_no_tile_means_the_planners_tile_for_the_devices_memory(device):
    budget = default_budget(get_device(device))
    assert budget == (
        get_device(device).memory_bytes // 2 if device == "cpu" else get_device(device).memory_bytes
    )
    plan = bp.make_plan(cnn(), (1, 3, 5000, 5000), device=device, training=True)
    chosen = choose_tile(cnn(), (1, 3, 5000, 5000), budget, device, training=True, make_plan=False)
    assert plan.tile == chosen.tile and plan.memory <= budget
    assert "no tile= or memory= given: the planner's tile" in plan.note and "fastest predicted" in plan.note
    assert "planner" in str(plan) and plan.note.split(";")[0] in str(plan)
    assert (
        bp.make_plan(cnn(), (1, 3, 5000, 5000), device=device, training=True, tile="auto").tile == chosen.tile
    )


def test_bp_tiled_without_a_tile_plans_with_the_planner():
    net = bp.tiled(cnn(torch.float64))
    x = torch.randn(1, 3, 64, 80, dtype=torch.float64)
    plan = net.plan_for(x)
    assert net.planned and "the planner's tile for half of this machine's" in plan.note
    torch.testing.assert_close(net(x), net.model(x))
