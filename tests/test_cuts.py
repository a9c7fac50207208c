"""Cuts: the network cut at chosen nodes into stages, each cut's whole value kept in a tier between
passes and read box by box by the next stage's tiles (engine/cuts.py, held.py).

Every case is compared with the untiled model in float64: outputs, parameter gradients and input
gradients, on grids of at least 3 tiles per dimension (tiles at every border and in the interior).
"""

from __future__ import annotations

import pytest
import torch
from helpers import _compare, _loss
from torch import nn

import bigpicture as bp
from bigpicture.engine import held
from bigpicture.engine.cuts import cut_names, plan_traffic


def conv(nd, *a, **k):
    return (nn.Conv2d if nd == 2 else nn.Conv3d)(*a, **k)


class Block(nn.Module):
    """A residual block: two 3x3 convolutions and a skip (strided: a 1x1 convolution)."""

    def __init__(self, nd, cin, cout, stride):
        super().__init__()
        self.a = conv(nd, cin, cout, 3, stride=stride, padding=1)
        self.b = conv(nd, cout, cout, 3, padding=1)
        self.skip = conv(nd, cin, cout, 1, stride=stride)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))) + self.skip(x))


class Classifier(nn.Module):
    """A stem, three residual blocks (strides 1, 2, 2) and a global average pooling: a reduced output."""

    def __init__(self, nd=2, c=2, w=4):
        super().__init__()
        self.stem = conv(nd, c, w, 3, padding=1)
        self.layer1 = Block(nd, w, w, 1)
        self.layer2 = Block(nd, w, 2 * w, 2)
        self.layer3 = Block(nd, 2 * w, 2 * w, 2)
        self.head = nn.Linear(2 * w, 3)

    def forward(self, x):
        y = self.layer3(self.layer2(self.layer1(torch.relu(self.stem(x)))))
        return self.head(y.flatten(2).mean(-1))


class UNet(nn.Module):
    """Encoder, a strided bottleneck and a decoder concatenated with the encoder's skip: a dense output."""

    def __init__(self, nd=2, c=2, w=4):
        super().__init__()
        up = nn.ConvTranspose2d if nd == 2 else nn.ConvTranspose3d
        self.enc = conv(nd, c, w, 3, padding=1)
        self.down = conv(nd, w, 2 * w, 3, stride=2, padding=1)
        self.mid = conv(nd, 2 * w, 2 * w, 3, padding=1)
        self.up = up(2 * w, w, 2, stride=2)
        self.dec = conv(nd, 2 * w, 3, 3, padding=1)

    def forward(self, x):
        e = torch.relu(self.enc(x))
        m = torch.relu(self.mid(torch.relu(self.down(e))))
        return self.dec(torch.cat([self.up(m), e], 1))


CASES = {  # name: (model, input shape, tile, cuts)
    "2d_classifier_one_cut": (Classifier, (2, 2, 32, 28), 8, ["layer1"]),
    "2d_classifier_two_cuts": (Classifier, (1, 2, 32, 32), 8, ["layer1", "layer2"]),
    "2d_classifier_cut_at_stem": (Classifier, (1, 2, 24, 24), 8, {"stem": "host"}),
    "2d_unet_frontier": (UNet, (1, 2, 24, 24), 8, ["enc", "mid"]),  # the skip and the bottleneck
    "2d_unet_bottleneck_only": (UNet, (1, 2, 24, 24), 8, ["mid"]),  # the skip recomputed by pass 1
    "2d_unet_device_tier": (UNet, (1, 2, 24, 20), 8, {"mid": "device", "enc": "host"}),
    "3d_classifier": (lambda: Classifier(nd=3), (1, 2, 16, 16, 12), 4, ["layer1", "layer2"]),
    "3d_unet_frontier": (lambda: UNet(nd=3), (1, 2, 12, 12, 12), 4, ["enc", "mid"]),
}


def _model(make):
    torch.manual_seed(0)
    return make().double()


def _check(model, shape, tile, cuts, training=True):
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64)
    net = bp.tiled(model, tile=tile, cuts=cuts)
    x0, x1 = x.clone().requires_grad_(training), x.clone().requires_grad_(training)
    with torch.set_grad_enabled(training):
        expected, got = model(x0), net(x1)
    _compare(got, expected, "output")
    assert len(net.plan.earlier) >= 1 and all(g > 2 for g in net.plan.grid), net.plan
    if training:
        params = list(model.parameters())
        g0 = torch.autograd.grad(_loss(expected), [x0, *params], allow_unused=True)
        g1 = torch.autograd.grad(_loss(got), [x1, *params], allow_unused=True)
        names = ["input"] + [n for n, _ in model.named_parameters()]
        for name, a, b in zip(names, g1, g0):
            if b is None:  # a parameter the model does not use (TokenNet's other attention)
                assert a is None or not a.any(), name
                continue
            _compare(a, b, f"gradient of {name}")
    return net


@pytest.mark.parametrize("name", CASES)
def test_cut_plan_equals_untiled_in_training(name, one_thread):
    make, shape, tile, cuts = CASES[name]
    _check(_model(make), shape, tile, cuts, training=True)


@pytest.mark.parametrize("name", ["2d_classifier_two_cuts", "2d_unet_frontier", "3d_unet_frontier"])
@pytest.mark.parametrize("tier", ["host", "zarr"])
def test_cut_plan_equals_untiled_in_inference(name, tier, one_thread):
    make, shape, tile, cuts = CASES[name]
    _check(_model(make).eval(), shape, tile, dict.fromkeys(cuts, tier), training=False)


def test_a_cut_beside_a_global_stage_is_exact(one_thread):
    """A cut in a network that holds attention's output whole too (``stages.materialise``)."""
    from test_stages import TokenNet

    _check(_model(TokenNet), (1, 2, 24, 24), 8, ["skip"], training=True)


def test_each_stage_has_its_own_smaller_halo(one_thread):
    model = _model(Classifier)
    plain = bp.make_plan(model, (1, 2, 64, 64), tile=16)
    staged = bp.make_plan(model, (1, 2, 64, 64), tile=16, cuts=["layer1", "layer2"])
    halos = [max(max(h) for h in p.halo) for p in (*staged.earlier, staged)]
    assert max(halos) < max(max(h) for h in plain.halo), (halos, plain.halo)
    assert staged.prediction.halo_overhead < plain.prediction.halo_overhead
    text = str(staged)
    assert "cuts" in text and "in host" in text and "moved per step" in text, text


def test_traffic_counts_what_a_run_holds_and_moves(one_thread, monkeypatch):
    """The bytes ``print(plan)`` says a cut holds and moves are those an inference run writes into
    the host tier and reads back from it."""
    model = _model(Classifier).eval()
    moved = []
    write, read = held.DeviceTier.write, held.Crop.read
    monkeypatch.setattr(held.DeviceTier, "write", lambda s, st, b, v: (moved.append(v.nbytes), write(s, st, b, v)))
    monkeypatch.setattr(held.Crop, "read", lambda s, out: (r := read(s, out), moved.append(r.nbytes))[0])
    net = bp.tiled(model, tile=8, cuts=["layer1"])
    with torch.no_grad():
        net(torch.randn(1, 2, 32, 32, dtype=torch.float64))
    (row,) = plan_traffic(net.plan)
    assert row.held == 4 * 32 * 32 * 8 and sum(moved) == row.moved, (row, sum(moved))


def deep(w=32, levels=4):
    """A chain of strided levels: a receptive field of a few hundred pixels, as a classifier has."""
    layers, c = [nn.Conv2d(2, w, 7, stride=2, padding=3), nn.ReLU()], w
    for _ in range(levels):
        layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU()] * 2
        c *= 2
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))


def test_auto_cuts_cut_a_deep_network_on_a_gpu_and_lower_its_predicted_time():
    torch.manual_seed(0)
    # wide enough that the halo's compute, not the host's per-node cost, dominates the L4's step (with
    # width 32 the float32 Winograd convolutions make the tile-128 step host-bound, and cuts add passes)
    model, shape = deep(64), (1, 2, 2048, 2048)
    plain = bp.make_plan(model, shape, tile=256, device="L4", training=True)
    auto = bp.make_plan(model, shape, tile=256, device="L4", training=True, cuts="auto", host_memory="64GiB")
    assert auto.earlier and "cut at" in auto.note and auto.earlier[0].tile == plain.tile, auto.note
    assert auto.time < plain.time and auto.prediction.halo_overhead < plain.prediction.halo_overhead


def test_cut_names_lists_the_tiled_nodes():
    plan = bp.make_plan(_model(UNet), (1, 2, 16, 16), tile=8)
    names = cut_names(plan)
    assert "enc" in names and "dec" in names and "x" not in names


ERRORS = {  # name: (cuts, training, host_memory, words the message must contain)
    "unknown_name": (["layer9"], False, None, ["no node or module called `layer9`", "layer1", "auto"]),
    "after_pooling": (["mean"], False, None, ["`mean`", "not a tiled one", "cut_names"]),
    "zarr_in_training": ({"layer1": "zarr"}, True, None, ["zarr tier", "inference only", "host"]),
    "host_budget": (["layer1"], True, 1000, ["host_memory=", "at least", "zarr"]),
    "unknown_tier": ({"layer1": "tape"}, False, None, ["no tier 'tape'", "host"]),
}


@pytest.mark.parametrize("name", ERRORS)
def test_bad_cuts_are_tiling_errors_that_say_how_to_fix_them(name, one_thread):
    cuts, training, host, words = ERRORS[name]
    model = _model(Classifier)
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    net = bp.tiled(model, tile=8, cuts=cuts, host_memory=host)
    with pytest.raises(bp.TilingError) as e, torch.set_grad_enabled(training):
        net(x)
    for word in words:
        assert word in str(e.value), str(e.value)


@pytest.mark.parametrize("training", [True, False])
def test_each_stage_may_take_its_own_tile(training, one_thread):
    """A later stage reads only held tensors, so it tiles on its own grid (``PerPass``)."""
    from bigpicture.engine import execute
    from bigpicture.engine.plan import PerPass, capture, plan_splits, split_graph

    model, shape = _model(UNet), (1, 2, 24, 24)
    inputs = [(shape, torch.float64, torch.device("cpu"))]
    splits = split_graph(capture(model, True, inputs), inputs, True, ["enc", "mid"])
    plan = plan_splits(splits, shape, torch.float64, PerPass([(8, 8), (4, 4), (6, 12)]))
    assert [p.grid for p in (*plan.earlier, plan)] == [(3, 3), (6, 6), (4, 2)]
    x = torch.randn(shape, dtype=torch.float64)
    x0, x1 = x.clone().requires_grad_(training), x.clone().requires_grad_(training)
    params = list(model.parameters())
    with torch.set_grad_enabled(training):
        expected, got = model(x0), execute.run(plan, (x1,), params, torch.device("cpu"))
    _compare(got, expected, "output")
    if training:
        for a, b in zip(torch.autograd.grad(_loss(got), [x1, *params]), torch.autograd.grad(_loss(expected), [x0, *params])):
            _compare(a, b, "gradient")


def test_the_planner_gives_later_stages_larger_tiles():
    torch.manual_seed(0)
    plan = bp.make_plan(deep(64), (1, 2, 2048, 2048), tile=256, device="L4", training=True, cuts="auto",
                        host_memory="64GiB")  # fmt: skip  (width 64: see the test above)
    tiles = [p.tile for p in (*plan.earlier, plan)]
    assert tiles[0] == (256, 256) and max(tiles) > (256, 256) and "its own tile" in plan.note, plan.note
