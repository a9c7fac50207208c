"""Networks that return dicts, lists and tuples (MONAI's HoVerNet returns a dict of branches): the
tiled net returns the same containers, of the model's own types, with every tensor and gradient
equal to the untiled model's; whether torch.fx traced the model or its run was recorded."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch
from helpers import assert_tiled_matches
from torch import nn

import bigpicture as bp

Heads = namedtuple("Heads", "dense pooled")

STRUCTURES = {
    "dict": lambda d, p: {"seg": d, "logits": p},
    "ordered_dict": lambda d, p: OrderedDict(hv=d, np=d * 2),
    "namedtuple": lambda d, p: Heads(d, p),
    "list_of_dict": lambda d, p: [d, {"a": p, "b": torch.tanh(d)}],
    "tuple_with_none": lambda d, p: (d, None, (p,)),
}


class Branches(nn.Module):
    """A trunk and two heads, one dense and one pooled, packed by ``pack``. ``traceable=False``
    iterates over channel chunks, which torch.fx cannot trace: the run is recorded instead."""

    def __init__(self, pack, traceable: bool):
        super().__init__()
        self.pack, self.traceable = pack, traceable
        self.trunk = nn.Conv2d(3, 4, 3, padding=1)
        self.dense = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.trunk(x))
        if not self.traceable:
            y = torch.cat([c * (k + 1) for k, c in enumerate(y.chunk(2, 1))], 1)
        return self.pack(self.dense(y), y.mean((2, 3)))


@pytest.mark.parametrize("traceable", [True, False], ids=["fx", "recorded"])
@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_structured_outputs_keep_the_models_containers(name, traceable, one_thread):
    torch.manual_seed(0)
    model = Branches(STRUCTURES[name], traceable).double()
    x = torch.randn(1, 3, 14, 13, dtype=torch.float64)
    net = assert_tiled_matches(model, x, 4)  # compares container types, keys, tensors, gradients
    assert len(net.plan.tiles) > 1
    capture = net.plan.split.gm.meta.get("bigpicture_capture", "fx")
    assert (capture == "recorded") != traceable


def test_structured_output_without_gradients(one_thread):
    torch.manual_seed(0)
    model = Branches(STRUCTURES["ordered_dict"], False).double().eval()
    x = torch.randn(1, 3, 14, 13, dtype=torch.float64)
    with torch.no_grad():
        got, expected = bp.tiled(model, tile=4)(x), model(x)
    assert type(got) is OrderedDict and list(got) == ["hv", "np"]
    torch.testing.assert_close(got, expected)
