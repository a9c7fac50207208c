"""Shape propagation's shortcuts (engine/shapes.py) give every node the value fake tensors give.

The light networks of the MONAI census (those in DEFAULT, the others with `-m slow`), propagated twice: with the shortcuts and with every
node on fake tensors. Shapes, dtypes and strides must agree node by node, and the shortcuts must
have been taken (a test that never takes them could not fail).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

import bigpicture as bp
from bigpicture.engine import capture as g
from bigpicture.engine import shapes
from bigpicture.engine.plan import capture

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:
    import census
    import monai.networks.nets  # noqa: F401
except ImportError:
    census = None


def _cases():
    if census is None:
        return [pytest.param(None, marks=pytest.mark.skip(reason="monai is not installed"))]
    return [
        pytest.param(
            c, id=census.case_id(c), marks=[] if census.case_id(c) in DEFAULT else [pytest.mark.slow]
        )
        for c in census.cases()
        if not c.heavy
    ]


DEFAULT = {"DenseNet121-2d", "UNet-3d", "DynUNet-3d", "SegResNet-2d", "AttentionUnet-2d", "SwinUNETR-2d"}


def _both(gm, inputs, monkeypatch):
    """Every node's value with the shortcuts, without them, and how many nodes took one."""
    taken = []
    real = shapes.shortcut

    def counted(*a):
        out = real(*a)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(g, "shortcut", counted)
    fast = g.propagate(gm, inputs)
    monkeypatch.setattr(g, "shortcut", lambda *a: None)
    slow = g.propagate(gm, inputs)
    return fast, slow, sum(taken)


def _described(value):
    leaves, spec = tree_flatten(value)
    return str(spec), [
        (tuple(v.shape), v.dtype, v.stride()) if isinstance(v, torch.Tensor) else v for v in leaves
    ]


def _assert_same(gm, fast, slow):
    for node in gm.graph.nodes:
        assert _described(fast[node]) == _described(slow[node]), node.format_node()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", _cases())
def test_shortcuts_give_the_shapes_of_fake_tensors(case, dtype, monkeypatch, request):
    if census.case_id(case) not in DEFAULT and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the light census rows outside DEFAULT run with `pytest -m slow`")
    torch.manual_seed(0)
    model = case.build().to(dtype).eval()
    inputs = [(case.shape, dtype, torch.device("cpu"))]
    try:
        gm = capture(model, True, inputs)
    except bp.TilingError:
        pytest.skip("not captured (the census row says why)")
    fast, slow, taken = _both(gm, inputs, monkeypatch)
    _assert_same(gm, fast, slow)
    assert taken > 0


def _mixed():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU(4), nn.MaxPool2d(2, ceil_mode=True))
    net[1].float()  # a float32 norm in a float64 network: no shortcut, fake tensors decide
    return net.double()


CASES = {  # network, input shape
    "channels last": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), None),
    "reflect padding, transposed, ceil pooling": (
        lambda: nn.Sequential(
            nn.Conv3d(1, 2, 3, padding=1, padding_mode="reflect"),
            nn.ConvTranspose3d(2, 2, 3, stride=2, output_padding=1),
            nn.AvgPool3d(3, 2, ceil_mode=True),
            nn.GroupNorm(1, 2),
            nn.Upsample(scale_factor=1.5, mode="trilinear"),
            nn.InstanceNorm3d(2, affine=True),
        ),
        (1, 1, 9, 10, 11),
    ),
    "mixed dtypes": (_mixed, (1, 3, 11, 11)),
    "train mode norm": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train(), (2, 3, 8, 8)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_shortcuts_on_layer_settings(name, monkeypatch):
    make, shape = CASES[name]
    model = make()
    dtype = next(model.parameters()).dtype
    if shape is None:  # a channels-last input: its strides go through the shortcuts
        value = torch.empty(1, 3, 12, 12, dtype=dtype).to(memory_format=torch.channels_last)
        inputs = [value]
    else:
        inputs = [(shape, dtype, torch.device("cpu"))]
    gm = capture(model, False)
    fast, slow, taken = _both(gm, inputs, monkeypatch)
    _assert_same(gm, fast, slow)
    assert taken > 0


@pytest.mark.parametrize(
    "net",
    [
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5)),
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 6)),
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU(3)),
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(5, 4, 3)),
        nn.Sequential(nn.Conv2d(3, 4, 7), nn.MaxPool2d(9)),
    ],
    ids=["batchnorm channels", "groupnorm channels", "prelu channels", "conv channels", "pool too large"],
)
def test_a_layer_that_fails_still_fails_naming_its_node(net):
    gm = capture(net, False)
    with pytest.raises(bp.TilingError, match=r"node `_?1`"):
        g.propagate(gm, [((1, 3, 8, 8), torch.float32, torch.device("cpu"))])


def test_no_shortcut_under_autocast(monkeypatch):
    """Autocast casts by op for the device it is on (meta tensors are on none): fake tensors decide."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    gm = capture(net, False)
    inputs = [((1, 3, 8, 8), torch.float32, torch.device("cpu"))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, slow, taken = _both(gm, inputs, monkeypatch)
    _assert_same(gm, fast, slow)
    assert taken == 0 and fast[next(n for n in gm.graph.nodes if n.op == "output")].dtype == torch.bfloat16
