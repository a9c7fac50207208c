"""The performance model for N devices: shares, imbalance and communication of one step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bigpicture as bp
from bigpicture.cli.plan import _count_and_device
from bigpicture.errors import TilingError
from bigpicture.perf.devices import INTERCONNECTS, get_interconnect
from bigpicture.perf.multi import LINK_EFFICIENCY, all_reduce_s


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2),
    )  # fmt: skip


def test_ring_all_reduce_formula():
    links = (INTERCONNECTS["NVLink4"], INTERCONNECTS["IB-NDR"])
    nv, ib = links
    expected = 2 * 7 / 8 * 1e9 / (LINK_EFFICIENCY * nv.bandwidth_bytes_per_s) + 14 * nv.latency_s
    assert all_reduce_s(1e9, 8, 1, links) == pytest.approx(expected)
    across = (
        expected + 2 * 1 / 2 * (1e9 / 8) / (LINK_EFFICIENCY * ib.bandwidth_bytes_per_s) + 2 * ib.latency_s
    )
    assert all_reduce_s(1e9, 16, 2, links) == pytest.approx(across)
    assert all_reduce_s(1e9, 1, 1, links) == 0.0


@pytest.mark.parametrize("training", [False, True])
def test_devices_share_the_one_device_time(training):
    shape = (1, 3, 2048, 2048)
    one = bp.make_plan(_model(), shape, tile=256, device="H100-SXM", training=training)
    four = bp.make_plan(_model(), shape, tile=256, device="H100-SXM", training=training, devices=4)
    p = four.prediction
    assert sum(p.shares) == pytest.approx(one.time) and len(p.shares) == 4
    assert p.imbalance >= 1 and one.time / 4 < four.time < one.time
    talk = dict(p.communication)
    assert ("parameter gradients" in talk) == training
    params = list(_model().parameters())
    buffer = 8 * (sum(q.numel() for q in params) + len(params) + 4)  # values, flags, each rank's clock
    assert four.memory == one.memory + (buffer if training else 0)
    assert "4 x H100-SXM on 1 node(s); NVLink4" in str(four)


def test_nodes_default_to_eight_devices_each():
    p = bp.make_plan(_model(), (1, 3, 1024, 1024), tile=256, device="A100-80GB", devices=16).prediction
    assert p.nodes == 2 and [x.name for x in p.links] == ["NVLink3", "IB-HDR"]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: bp.make_plan(_model(), (1, 3, 64, 64), tile=32, devices=6, nodes=4).time, "same number"),
        (lambda: get_interconnect("NVLink9"), "no interconnect 'NVLink9'"),
    ],
)
def test_clear_errors(call, match):
    with pytest.raises(TilingError, match=match):
        call()


@pytest.mark.parametrize(
    "text, count, name", [("8xH100-SXM", 8, "H100-SXM"), ("cpu", 1, "cpu"), ("A100-80GB", 1, "A100-80GB")]
)
def test_cli_device_counts(text, count, name):
    n, dev = _count_and_device(text)
    assert (n, dev.name) == (count, name)


@pytest.mark.parametrize("devices", [4, 16])
def test_the_planner_chooses_the_fastest_tile_for_n_devices(devices):
    """Against every candidate tile: each that fits is predicted no faster on N devices than the
    choice, or (the many small ones, not predicted) has a bound of its time that already is not."""
    from bigpicture.perf.schedule import analyse, candidates, least_time

    shape, budget = (1, 3, 1024, 1024), 2 * 2**30
    chosen = bp.make_plan(_model(), shape, device="H100-SXM", devices=devices, training=True, memory=budget)
    splits = analyse(_model(), shape)
    predicted = bounded = 0
    for tile in candidates(splits, shape):
        bound = least_time(splits, shape, torch.float32, tile, "H100-SXM", True) / devices
        if bound >= chosen.time:
            bounded += 1
            continue
        p = bp.make_plan(_model(), shape, tile=tile, device="H100-SXM", devices=devices, training=True)
        predicted += 1
        assert p.memory > budget or p.time >= chosen.time * (1 - 1e-9), (
            tile,
            p.time,
            chosen.tile,
            chosen.time,
        )
    assert predicted >= 2 and bounded >= 1 and chosen.memory <= budget
    assert chosen.prediction.devices == devices and chosen.prediction.single.tile == chosen.tile


def test_n_devices_choose_more_tiles_than_one():
    """One device takes the whole image as one tile; on 4 devices that leaves three idle, so the
    planner splits it, and its note says why, against the one-device choice."""
    shape = (1, 3, 2048, 2048)
    one = bp.make_plan(_model(), shape, device="H100-SXM", training=True)
    four = bp.make_plan(_model(), shape, device="H100-SXM", devices=4, training=True)
    assert len(one.tiles) == 1 and len(four.tiles) >= 4
    assert (
        four.time
        < bp.make_plan(_model(), shape, tile=one.tile, device="H100-SXM", devices=4, training=True).time
    )
    note = four.prediction.single.note
    assert "fastest predicted step on 4 devices" in note and "the fastest on one device, 2048 x 2048" in note
    assert "planner" in str(four) and "4 x H100-SXM" in str(four)


def test_no_tile_fits_n_devices_is_a_clear_error():
    with pytest.raises(TilingError, match="per device on 4 x H100-SXM"):
        bp.make_plan(_model(), (1, 3, 256, 256), device="H100-SXM", devices=4, memory="1MiB", training=True)


def test_cli_plans_the_tile_for_n_devices(tmp_path, capsys):
    from bigpicture.cli import main

    (tmp_path / "net.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), "
        "nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1))\n"
    )
    args = ["plan", "--model", f"{tmp_path / 'net.py'}:make", "--input", "3x1024x1024", "--train"]
    assert main(args + ["--device", "H100-SXM,4xH100-SXM"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    expected = bp.make_plan(_model()[:4], (1, 3, 1024, 1024), device="H100-SXM", devices=4, training=True)
    assert rows["4xH100-SXM"][3] == "x".join(map(str, expected.tile)) and "N devices" in " ".join(
        rows["4xH100-SXM"]
    )
    assert rows["H100-SXM"][3] == "1024x1024"


def test_n_devices_with_the_planners_tile_predict_compiled_tiles():
    """``compile=True`` with no tile: the tile is chosen as for eager tiles, its step predicted compiled."""
    shape, run = (1, 3, 2048, 2048), dict(device="H100-SXM", devices=4, training=True)
    eager = bp.make_plan(_model(), shape, **run)
    compiled = bp.make_plan(_model(), shape, compile=True, **run)
    given = bp.make_plan(_model(), shape, tile=compiled.tile, compile=True, **run)
    assert compiled.tile == eager.tile and compiled.time == pytest.approx(given.time)
    assert compiled.prediction.single.time < eager.prediction.single.time
