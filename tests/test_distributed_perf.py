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
    params = sum(q.numel() for q in _model().parameters())
    assert four.memory == one.memory + (8 * params if training else 0)
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
