import re

import pytest
import torch
from torch import nn

import bigpicture as bp
from bigpicture.perf.predict import predict, predict_splits
from bigpicture.perf.schedule import _size_up, analyse, best_tile, candidates, choose_tile, parse_memory

GiB, MiB = 2**30, 2**20


@pytest.fixture(autouse=True)
def _uncalibrated(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))


def net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 2, 1),
    ).eval()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8GiB", 8 * GiB),
        ("512 MiB", 512 * MiB),
        ("1.5G", int(1.5 * GiB)),
        ("24GB", 24 * 10**9),
        (4096, 4096),
        ("100", 100),
        ("1,023.50 MiB", int(1023.5 * MiB)),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["8 potatoes", "GiB", "-1GiB", ""])
def test_parse_memory_errors(text):
    with pytest.raises(bp.TilingError, match="not a size"):
        parse_memory(text)


def test_candidates_are_whole_output_pixels_up_to_the_image():
    shape = (1, 3, 1000, 700)
    splits = analyse(net(), shape)
    tiles = candidates(splits, shape)
    assert tiles[-1] == (1000, 700)
    assert all(t % 2 == 0 or t in (1000, 700) for tile in tiles for t in tile)  # the network's stride is 2
    assert len(set(tiles)) == len(tiles) and tiles == sorted(tiles, key=lambda t: t[0] * t[1])


@pytest.mark.parametrize("budget", [24 * MiB, 40 * MiB, 80 * MiB, 200 * MiB, 8 * GiB])
@pytest.mark.parametrize("training", [False, True])
def test_the_planner_never_exceeds_the_budget(budget, training):
    shape = (1, 3, 2048, 2048)
    splits = analyse(net(), shape)
    try:
        best = best_tile(splits, shape, budget, "cpu", training=training)
    except bp.TilingError as e:
        assert "at least" in str(e)
        return
    assert best.memory <= budget
    fits = [t for t in candidates(splits, shape)]
    assert best.tile in fits and "fastest predicted" in best.note


def test_choose_tile_returns_the_plan_it_predicted():
    shape = (1, 3, 1024, 1024)
    tile, plan, prediction = choose_tile(net(), shape, "64MiB", "cpu")
    assert plan.tile == tile == prediction.tile
    assert prediction.memory <= 64 * MiB
    assert predict(plan, "cpu").memory == prediction.memory
    assert "planner" in str(prediction)


def test_a_larger_budget_never_makes_it_slower():
    shape = (1, 3, 2048, 2048)
    splits = analyse(net(), shape)
    times = [
        best_tile(splits, shape, b, "A100-80GB", torch.bfloat16).time for b in ("700MiB", "1GiB", "4GiB")
    ]
    assert times == sorted(times, reverse=True)


def test_no_tile_fits_says_the_least_memory_that_would():
    shape = (1, 3, 4096, 4096)
    with pytest.raises(bp.TilingError) as e:
        choose_tile(net(), shape, "1MiB", "cpu", make_plan=False)
    text = str(e.value)
    assert "no tile fits 1.00 MiB" in text and "at least" in text
    # the dense output alone is 2 x 2048 x 2048 floats: no tile can go below it
    assert "boundary tensors 32.00 MiB" in text
    splits = analyse(net(), shape)
    least = min(predict_splits(splits, shape, torch.float32, t).memory for t in (16, 32, 64))
    said = re.search(r"at least ([0-9.,]+ [KMG]iB)", text)[1]
    assert said == _size_up(least) and parse_memory(said) >= least > parse_memory(said) - MiB / 100
    # the size it names, copied as written, is a budget the planner can meet
    assert choose_tile(net(), shape, said, "cpu", make_plan=False).prediction.memory <= parse_memory(said)


@pytest.mark.parametrize("n", [1000, 1024, 1025, MiB + 1, 5 * GiB - 1, 1023 * MiB + 7, 1024 * MiB - 1])
def test_sizes_in_errors_round_up_and_read_back(n):
    text = _size_up(n)
    assert parse_memory(text) >= n and parse_memory(text) < n + max(n // 99, 1)


def test_gpu_budget_includes_the_framework():
    shape = (1, 3, 2048, 2048)
    with pytest.raises(bp.TilingError, match="CUDA context"):
        choose_tile(net(), shape, "256MiB", "T4", torch.float16, make_plan=False)
