"""Window ops padded at the image border by their own ``padding=`` (``rules/window.NativePadding``)
instead of a padded copy of their input: tiled equals untiled in float64 (outputs, parameter and
input gradients) where a tile reaches outside the image by different amounts below and above,
with strides, dilations and even kernels, in 1D, 2D and 3D, on grids with tiles at every border
and in the interior; and no padded copy is made for a zero-padded convolution, but for a 3D one on
a CPU (``Conv.pads_natively``). The rule a GPU follows (native everywhere) is run here too, on the
CPU, by asking every op as if it were not one."""

from __future__ import annotations

import pytest
import torch
from helpers import _loss, assert_tiled_matches
from torch import nn

import bigpicture as bp
from bigpicture.engine import padding
from bigpicture.engine.rules import window

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
SHAPES = {1: ((2, 3, 37), 8), 2: ((1, 3, 23, 19), 7), 3: ((1, 3, 19, 17, 15), 5)}


def conv(nd, k, **kw):
    return lambda: CONV[nd](4, 4, k, **kw)


def pool(nd, k, **kw):
    return lambda: MAXPOOL[nd](k, **kw)


# name: (the middle layer's maker of nd, whether it may pad with a copy: a max pooling whose border
# is over half its kernel, which PyTorch's padding refuses)
CASES = {
    "conv_3_pad_1": (lambda nd: conv(nd, 3, padding=1), False),
    "conv_5_stride_2_pad_2": (lambda nd: conv(nd, 5, stride=2, padding=2), False),
    "conv_3_stride_3_pad_1": (lambda nd: conv(nd, 3, stride=3, padding=1), False),
    "conv_4_stride_2_pad_3": (lambda nd: conv(nd, 4, stride=2, padding=3), False),
    "conv_3_dilation_2_pad_2": (lambda nd: conv(nd, 3, dilation=2, padding=2), False),
    "conv_3_dilation_3_stride_2_pad_1": (lambda nd: conv(nd, 3, dilation=3, stride=2, padding=1), False),
    "conv_same_even_kernel": (lambda nd: conv(nd, 4, padding="same"), False),
    "conv_groups_stride_2": (lambda nd: lambda: CONV[nd](4, 4, 3, stride=2, padding=1, groups=2), False),
    "maxpool_3_stride_2_pad_1": (lambda nd: pool(nd, 3, stride=2, padding=1), True),
    "maxpool_2_stride_2_pad_1": (lambda nd: pool(nd, 2, stride=2, padding=1), True),
    "maxpool_5_stride_1_pad_2": (lambda nd: pool(nd, 5, stride=1, padding=2), True),
    "maxpool_3_stride_3_pad_1_dilation_2": (lambda nd: pool(nd, 3, stride=3, padding=1, dilation=2), True),
}  # fmt: skip


def model(nd, middle):
    return nn.Sequential(CONV[nd](3, 4, 3, padding=1), nn.ReLU(), middle(), CONV[nd](4, 2, 3, padding=1))


def as_on(device: str, monkeypatch) -> bool:
    """Whether the ops decide as on a CPU (the device the tests run on) or, for "gpu", as on
    another device: every ``pads_natively`` asked with ``cpu=False``. Returns ``cpu``."""
    if device == "gpu":
        for kind in (window.Conv, window.MaxPool):
            asked = kind.pads_natively
            monkeypatch.setattr(kind, "pads_natively", lambda self, cpu, asked=asked: asked(self, False))
    return device == "cpu"


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_natively_padded_window_tiled_equals_untiled(name, nd, device, one_thread, monkeypatch):
    make, may_copy = CASES[name]
    cpu = as_on(device, monkeypatch)
    copies = []
    pad = padding._Pad.apply
    monkeypatch.setattr(padding._Pad, "apply", lambda *a: copies.append(1) or pad(*a))
    shape, tile = SHAPES[nd]
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    net = assert_tiled_matches(model(nd, make(nd)).double(), x, tile)
    assert min(net.plan.grid) >= 3, "tiles at every border and in the interior"
    if cpu and nd == 3 and name.startswith("conv"):  # the 3D convolution pads by a copy on a CPU
        assert copies, "a 3D zero-padded convolution on a CPU reads a padded copy at the border"
    else:
        assert may_copy or not copies, f"{len(copies)} padded copies of a zero-padded convolution's input"


@pytest.mark.parametrize("training", [False, True])
def test_whole_image_tile_of_a_cut_pads_natively(training, one_thread, monkeypatch):
    """A later stage's one tile covers its whole image: every layer's border is on both sides."""
    from bigpicture.engine import execute
    from bigpicture.engine.plan import PerPass, capture, plan_splits, split_graph

    copies = []
    pad = padding._Pad.apply
    monkeypatch.setattr(padding._Pad, "apply", lambda *a: copies.append(1) or pad(*a))
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                      nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 5, padding=2)).double()
    shape = (1, 3, 24, 20)
    inputs = [(shape, torch.float64, torch.device("cpu"))]
    splits = split_graph(capture(m, True, inputs), inputs, True, ["3"])
    plan = plan_splits(splits, shape, torch.float64, PerPass([(8, 8), (24, 20)]))
    assert [p.grid for p in (*plan.earlier, plan)] == [(3, 3), (1, 1)], "the later stage: one whole tile"
    x = torch.randn(shape, dtype=torch.float64)
    x0, x1 = x.clone().requires_grad_(training), x.clone().requires_grad_(training)
    params = list(m.parameters())
    with torch.set_grad_enabled(training):
        expected, got = m(x0), execute.run(plan, (x1,), params, torch.device("cpu"))
    torch.testing.assert_close(got, expected)
    if training:
        for a, b in zip(torch.autograd.grad(_loss(got), [x1, *params]),
                        torch.autograd.grad(_loss(expected), [x0, *params])):
            torch.testing.assert_close(a, b)
    assert not copies


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_crops_says_which_outputs_are_strided_views(name, nd, device, one_thread, monkeypatch):
    """``crops`` (what the performance model reads) is true exactly where the tile interpreter's
    natively padded result is a strided view: the outputs the symmetric padding adds dropped."""
    make, _ = CASES[name]
    cpu = as_on(device, monkeypatch)
    shape, tile = SHAPES[nd]
    torch.manual_seed(0)
    m = model(nd, make(nd)).double().eval()
    net = bp.tiled(m, tile=tile)
    x = torch.randn(shape, dtype=torch.float64)
    plan = net.plan_for(x, training=False)
    node = next(n for n in plan.split.order if n.op == "call_module" and n.target == "2")
    op, seen = plan.split.ops[node], []
    run = op.padded_natively

    def recorded(out, *args):
        y = run(out, *args)
        seen.append((any(op.crops(out, cpu)), not y.is_contiguous()))
        return y

    op.padded_natively = recorded
    with torch.no_grad():
        net(x)
    if cpu and nd == 3 and name.startswith("conv"):
        assert not seen, "a 3D convolution on a CPU reads a padded copy, never pads natively"
        return
    assert len(seen) == len(plan.tiles)
    assert all(a == b for a, b in seen), seen
    assert any(a for a, _ in seen) or name.startswith("maxpool"), "a padded convolution crops somewhere"
