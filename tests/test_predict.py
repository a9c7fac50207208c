import time
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigpicture as bp
from bigpicture.perf.devices import DEVICES, local_cpu
from bigpicture.perf.grid import _group, layout, tile_classes
from bigpicture.perf.predict import predict, predict_splits
from bigpicture.perf.rates import Rates, _interpolate
from bigpicture.perf.schedule import analyse

F32 = 4


@pytest.fixture(autouse=True)
def _uncalibrated(tmp_path, monkeypatch):
    # nominal CPU rates: predictions must not depend on this machine's calibration
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))


def parts(p) -> dict:
    return dict(p.memory_parts)


# on a GPU, with the input already there, nothing but the values themselves is counted in a tile
GPU = {"device": "A100-80GB", "input_on_device": True}


def test_one_conv_one_tile_memory_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).eval()
    p = predict(bp.make_plan(net, (1, 3, 32, 32), tile=32), **GPU)
    out = 8 * 32 * 32 * F32
    # the tile touches every border, and the convolution pads it with its own padding=: no padded copy
    assert parts(p)["parameters"] == (8 * 3 * 9 + 8) * F32
    assert parts(p)["boundary tensors"] == out  # the dense output
    # the new output while the conv runs, and the previous tile's output
    assert parts(p)["tile working set"] == out + out
    assert p.memory == sum(parts(p).values()) and p.tiles == 1
    # a CPU convolution also holds a workspace (oneDNN's layouts): 1 x its larger operand uncalibrated
    cpu = predict(bp.make_plan(net, (1, 3, 32, 32), tile=32), "cpu")
    assert parts(cpu)["tile working set"] == out + out + max(out, 3 * 32 * 32 * F32)


def test_reflect_padded_conv_charges_its_padded_copy():
    # a reflect-padded convolution reads a padded copy at the border (the engine pads it explicitly)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")).eval()
    p = predict(bp.make_plan(net, (1, 3, 32, 32), tile=32), **GPU)
    out, padded = 8 * 32 * 32 * F32, 3 * 34 * 34 * F32
    assert parts(p)["tile working set"] == out + padded + out


def test_values_are_freed_at_their_last_use():
    # 1x1 convs need no padding; each value dies when the next op has read it
    net = nn.Sequential(nn.Conv2d(2, 16, 1), nn.Conv2d(16, 4, 1), nn.Conv2d(4, 1, 1)).eval()
    p = predict(bp.make_plan(net, (1, 2, 10, 10), tile=10), **GPU)
    px = 10 * 10 * F32
    # the peak is while the second conv writes its 4 channels and its 16-channel input is alive
    assert parts(p)["tile working set"] == px * (16 + 4) + px * 1  # + the previous tile's 1-channel sink


def test_inplace_and_identity_allocate_nothing():
    a = nn.Sequential(nn.Conv2d(2, 8, 1), nn.ReLU(), nn.Identity(), nn.Conv2d(8, 1, 1)).eval()
    b = nn.Sequential(nn.Conv2d(2, 8, 1), nn.ReLU(inplace=True), nn.Identity(), nn.Conv2d(8, 1, 1)).eval()
    pa, pb = (predict(bp.make_plan(m, (1, 2, 8, 8), tile=8), **GPU) for m in (a, b))
    px = 8 * 8 * F32
    assert parts(pa)["tile working set"] == px * (8 + 8) + px  # ReLU's output next to its input
    assert parts(pb)["tile working set"] == px * (8 + 1) + px  # written in place: conv in + conv out


def test_training_keeps_what_autograd_saves():
    net = nn.Sequential(nn.Conv2d(2, 8, 1), nn.ReLU(), nn.Conv2d(8, 1, 1))
    plan = bp.make_plan(net, (1, 2, 8, 8), tile=8)
    px = 8 * 8 * F32
    train = predict(plan, "cpu", training=True)
    # recompute: conv1 saves the input (the caller's, not counted), ReLU its output, conv2 its input
    # (the same storage); the backward adds gradient buffers
    assert parts(train)["tile working set"] >= px * 8 + px * 8
    n_params = sum(q.numel() for q in net.parameters())
    # one tile runs with plain autograd: the parameters' gradients; several tiles: two tiles' gradients
    # and their sum, which the engine keeps in float64
    assert parts(train)["parameter gradients"] == n_params * F32
    tiles = predict(bp.make_plan(net, (1, 2, 8, 8), tile=4), "cpu", training=True)
    assert parts(tiles)["parameter gradients"] == n_params * (2 * F32 + 8)
    assert parts(train)["boundary gradients"] == parts(train)["boundary tensors"] == px
    assert train.memory > predict(plan, "cpu").memory


def test_flops_of_a_conv_net_by_hand():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1)
    ).eval()
    n, h, w = 2, 16, 20
    conv1 = 2 * n * 8 * h * w * 3 * 9
    conv2 = 2 * n * 4 * (h // 2) * (w // 2) * 8 * 9
    plan = bp.make_plan(net, (n, 3, h, w), tile=(h, w))
    inference = predict(plan, "cpu")
    # as torch.utils.flop_counter counts: convolutions and matmuls; the other ops are timed by their bytes
    assert inference.flops == conv1 + conv2 and inference.halo_overhead == 0
    training = predict(plan, "cpu", training=True)
    # one tile: a forward with autograd (its graph kept, nothing recomputed), and the backward: weight
    # gradients, and input gradients but the first's
    assert training.flops == (conv1 + conv2) + conv1 + 2 * conv2


def test_halo_overhead_is_the_extra_work_of_the_tiles():
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1)).eval()
    p = predict(bp.make_plan(net, (1, 1, 1, 40), tile=(1, 10)), "cpu")
    # the first conv computes 1 extra column on each inner side of each of the 4 tiles
    assert p.flops == 2 * 9 * (40 + 6) + 2 * 9 * 40
    assert p.halo_overhead == pytest.approx((2 * 9 * 86) / (2 * 9 * 80) - 1)


NETS = {
    "chain": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(4, 2, 5, padding=2),
        ),
        (1, 1, 203, 181),
        [16, 24, 50],
    ),
    "classifier": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ),
        (1, 1, 150, 230),
        [12, 36],
    ),
    "3d": (
        lambda: nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.MaxPool3d(2), nn.Conv3d(2, 2, 3, padding=1)),
        (1, 1, 30, 26, 34),
        [8, 12],
    ),
}


@pytest.mark.parametrize("name", list(NETS))
def test_tile_classes_cover_the_plans_tiles_exactly(name):
    make, shape, tiles = NETS[name]
    net = make().eval()
    for tile in tiles:
        plan = bp.make_plan(net, shape, tile=tile)
        classes = tile_classes(plan.split, layout(plan.split, shape, tile))
        exact = _group(plan.split, ((1, t.writes, plan.needs(t)) for t in plan.tiles))

        def weighted(cl):
            out = Counter()
            for c in cl:  # classes of equal shapes (touching other borders) add up
                out[tuple(w.shape for w in c.writes), tuple(b.shape for b in c.need.values())] += c.count
            return out

        assert sum(c.count for c in classes) == len(plan.tiles) == predict(plan).tiles
        assert weighted(classes) == weighted(exact)
        assert len(classes) <= 3 ** len(shape[2:]) * 2


def test_whole_slide_predicts_in_seconds_without_allocating():
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    ).eval()
    shape = (1, 3, 100_000, 100_000)
    start = time.perf_counter()
    splits = analyse(net, shape)
    p = predict_splits(splits, shape, torch.bfloat16, 1000, "H100-SXM", training=True)
    assert time.perf_counter() - start < 30
    assert p.tiles == 100 * 100 and p.classes <= 9  # corners, edges, interior (mirror images cost alike)
    assert p.flops > 2 * 2 * 16 * 3 * 9 * shape[2] * shape[3]  # at least the first conv, forward twice
    assert 0 < p.time < 3600 and p.memory < 80 * 2**30


def test_dtype_and_device():
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
    plan = bp.make_plan(
        net, (1, 3, 4096, 4096), tile=1024
    )  # big enough for the GPU work to outlast the host's
    f32 = predict(plan, "A100-80GB", training=True)
    bf16 = predict(plan, "A100-80GB", training=True, dtype=torch.bfloat16)
    assert parts(bf16)["tile working set"] * 2 == parts(f32)["tile working set"]
    assert bf16.time < f32.time
    assert "CUDA context" in str(f32) and parts(f32)["framework (CUDA context, allocator, workspace)"] > 2**29
    h100 = predict(plan, "H100-SXM", training=True, dtype=torch.bfloat16)
    assert h100.time < bf16.time and h100.memory == bf16.memory


def test_prediction_prints_its_parts():
    plan = bp.make_plan(nn.Sequential(nn.Conv2d(1, 2, 3)).eval(), (1, 1, 64, 64), tile=32)
    text = str(predict(plan, "cpu", training=True))
    for word in ("peak memory", "tile working set", "recompute", "backward", "halo overhead", "uncalibrated"):
        assert word in text


def test_rates():
    assert _interpolate([1, 100], [10.0, 30.0], 10) == pytest.approx(20.0)
    assert (
        _interpolate([1, 100], [10.0, 30.0], 0.5) == 10.0
        and _interpolate([1, 100], [10.0, 30.0], 1e4) == 30.0
    )
    gpu = Rates(DEVICES["A100-80GB"], torch.bfloat16)
    big, small = gpu.conv(2, 64 * 9, 256, 2**20), gpu.conv(2, 3 * 9, 16, 1024)
    assert small < big < 0.7 * DEVICES["A100-80GB"].peak(torch.bfloat16)
    assert gpu.stream("unary", 2**30) == pytest.approx(0.8 * 2.039e12, rel=0.01)
    cpu = Rates(local_cpu(), torch.float32)
    assert not cpu.measured and cpu.conv(2, 27, 16, 1000) == 0.5 * local_cpu().peak(torch.float32)


def test_device_of_a_torch_device():
    from bigpicture.perf.devices import for_torch

    assert for_torch("cpu").name == "cpu" and for_torch(torch.device("cpu")).cores >= 1
    with pytest.raises(bp.TilingError, match="no performance figures"):
        for_torch("meta")


def test_cpu_convolution_workspace_follows_the_calibration():
    cal = {"ops": {"dtype": "float32", "conv": [], "stream": {}, "pool": {}, "engine_node_s": 0.0,
                   "engine_train_node_s": 0.0, "conv_workspace": {"2": ["operand", 0.5], "3": ["im2col", 1.0]}}}  # fmt: skip
    cpu = Rates(local_cpu(), torch.float32, cal)
    assert cpu.workspace(2, operand_bytes=1000, im2col_bytes=9000) == 500
    assert cpu.workspace(3, operand_bytes=1000, im2col_bytes=27000) == 27000
    assert Rates(DEVICES["T4"], torch.float16).workspace(2, 1000, 9000) == 0  # in the GPU allowance


class _FunctionalConvs(nn.Module):
    def __init__(self, conv, convt):
        super().__init__()
        self.conv, self.convt = conv, convt

    def forward(self, x):
        x = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1, groups=2)
        return F.conv_transpose2d(x, self.convt.weight, self.convt.bias, stride=2, padding=1, groups=2)


@pytest.mark.parametrize("functional", [False, True])
def test_flops_of_conv_and_transposed_conv_rules_by_hand(functional):
    from torch.utils.flop_counter import FlopCounterMode

    from bigpicture.engine.box import Box
    from bigpicture.engine.rules.resample import ConvTranspose
    from bigpicture.engine.rules.window import Conv

    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    convt = nn.ConvTranspose2d(6, 10, 3, stride=2, padding=1, groups=2)
    net = _FunctionalConvs(conv, convt) if functional else nn.Sequential(conv, convt)
    shape = (1, 4, 5, 7)
    (split,) = analyse(net.eval(), shape)
    by_kind = {
        type(op): (node, op) for node, op in split.ops.items() if isinstance(op, (Conv, ConvTranspose))
    }
    whole = {k: Box.from_shape(split.extents[node]) for k, (node, _) in by_kind.items()}
    # Conv2d: each of the 5 x 7 outputs of each of the 6 channels reads 4/2 channels x 3 x 3
    conv_op = by_kind[Conv][1]
    assert conv_op.flops(whole[Conv], 6) == 2 * (5 * 7) * 6 * (4 // 2) * 9 == 7560
    # ConvTranspose2d: each of the 5 x 7 inputs of each of the 6 channels scatters into 10/2 channels x 3 x 3
    assert split.extents[by_kind[ConvTranspose][0]] == (9, 13)
    convt_op = by_kind[ConvTranspose][1]
    assert convt_op.flops(whole[ConvTranspose], 10) == 2 * (5 * 7) * 6 * (10 // 2) * 9 == 18900
    # as torch counts them (batch 1)
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(shape))
    assert counter.get_total_flops() == 7560 + 18900
