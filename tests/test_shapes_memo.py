"""``shapes._on_meta`` keeps a layer's output (shape, strides, dtype) by its settings and input
(``_meta_key``): the kept value must be what the layer gives on meta tensors, for layers alike but
in one setting (an average pooling's ``ceil_mode``, which its ``extra_repr`` does not show; a
convolution's weight in another memory layout; True against 1), and nothing is kept for a layer
with a hook (its forward may change the output). Compared with ``_meta_output`` uncached, and a
deep census network's propagation with the memo against one without it, node by node.
"""

from __future__ import annotations

import pytest
import torch
from test_shapes import _assert_same, census
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from bigpicture.engine import capture as g
from bigpicture.engine import shapes
from bigpicture.engine.plan import capture


def _layers():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    last = nn.Conv2d(4, 6, 3, padding=1)
    last.weight.data = last.weight.data.to(memory_format=torch.channels_last)
    upsample_int, upsample_float = nn.Upsample(scale_factor=2), nn.Upsample(scale_factor=2.5)
    return [
        nn.AvgPool2d(3, 2), nn.AvgPool2d(3, 2, ceil_mode=True), nn.MaxPool2d(3, 2, ceil_mode=True),
        conv, last, nn.Conv2d(4, 6, 3, stride=2), nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1),
        upsample_int, upsample_float, nn.Flatten(1), nn.AdaptiveAvgPool2d(3),
    ]  # fmt: skip


SHAPES = [(1, 4, 15, 13), (2, 4, 16, 16)]


def _described(t):
    return None if t is None else (tuple(t.shape), t.stride(), t.dtype)


def test_kept_outputs_are_the_layers_own():
    shapes._META.clear()
    with FakeTensorMode(allow_non_fake_inputs=True):
        for _ in range(2):  # the second time from the memo
            for layer in _layers():
                for shape in SHAPES:
                    x = torch.empty(shape)
                    got = _described(shapes._on_meta(layer, x))
                    assert got == shapes._meta_output(layer, x), (layer, shape)
    assert len(shapes._META) == len(_layers()) * len(SHAPES)


def test_true_is_not_one_in_a_key():
    a, b = nn.Flatten(1), nn.Flatten(True)
    x = torch.empty(2, 3, 4)
    assert shapes._meta_key(a, x) != shapes._meta_key(b, x)


def test_no_memo_for_a_layer_with_a_hook():
    layer = nn.Conv2d(1, 1, 3)
    x = torch.empty(1, 1, 8, 8)
    assert shapes._meta_key(layer, x) is not None
    handle = layer.register_forward_hook(lambda m, i, o: o[..., :2])
    assert shapes._meta_key(layer, x) is None
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        assert shapes._meta_key(layer, x) is None
    finally:
        handle.remove()


@pytest.mark.skipif(census is None, reason="monai is not installed")
def test_a_deep_network_propagates_alike_with_and_without_the_memo(monkeypatch):
    case = next(c for c in census.cases() if census.case_id(c) == "SEResNet50-2d")
    torch.manual_seed(0)
    inputs = [(tuple(case.shape), torch.float32, torch.device("cpu"))]
    gm = capture(case.build().eval(), inputs=inputs)
    shapes._META.clear()
    fast = g.propagate(gm, inputs)
    assert shapes._META  # kept, and read: fewer kinds than layers on meta
    monkeypatch.setattr(shapes, "_meta_key", lambda module, x: None)
    slow = g.propagate(gm, inputs)
    _assert_same(gm, fast, slow)
