"""The least predicted peak of the planner's error (``search.least_prediction``) reads a pass's
peak off the one tile whose kinds bound every other (``perf/least.py``): its memory, parts and tile
must be those of predicting every pass and every class (``predict_splits`` with byte-counting rates,
the reference, as the planner did before), and the error ``best_tile`` raises the same text.

Cases: squeeze-and-excitation networks (many passes; MONAI's at a small size), a network whose
peak an earlier pass holds, 2D and 3D, training and inference, the CPU and a GPU; random
networks (hypothesis). Each pass read off a tile is also checked against its own prediction.
"""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from test_plan_passes import NETS as PASS_NETS
from test_random_architectures import blueprints, examples
from torch import nn

from bigpicture.engine.plan import tile_of
from bigpicture.errors import TilingError
from bigpicture.perf import least, predict
from bigpicture.perf import search as search_module
from bigpicture.perf.bytes_only import bytes_only
from bigpicture.perf.devices import get_device
from bigpicture.perf.grid import layout
from bigpicture.perf.schedule import analyse, best_tile, candidates
from bigpicture.perf.walk import TileWalk, tile_at, walk

DEVICES = ["cpu", "H100-SXM"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))  # this CPU uncalibrated


class Early(nn.Module):
    """A squeeze of a wide early value gating a narrow tail: the first pass holds the wide value as
    its sink (and the previous tile's), the last only narrow ones, so the first holds the peak."""

    def __init__(self):
        super().__init__()
        self.wide, self.fc = nn.Conv2d(1, 16, 5, padding=2), nn.Conv2d(16, 1, 1)
        self.narrow = nn.Sequential(
            nn.Conv2d(16, 1, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(1, 1, 3, padding=1)
        )

    def forward(self, x):
        y = F.relu(self.wide(x))
        return self.narrow(y) * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))


class Twin(nn.Module):
    """Two squeezes of one value, the second of the value scaled by the first: three passes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        a = torch.sigmoid(y.mean((2, 3), keepdim=True))
        b = torch.sigmoid((y * a).mean((2, 3), keepdim=True))
        return y * b


def monai(name, dims):
    from monai.networks import nets

    return lambda: getattr(nets, name)(spatial_dims=dims, in_channels=1, num_classes=2, layers=(1, 1, 1, 1))


NETS = {  # name: (network, input shape)
    **{f"excite {k}": v for k, v in PASS_NETS.items()},
    "early peak": (Early, (1, 1, 72, 60)),
    "twin squeezes": (Twin, (1, 1, 40, 36)),
    "SEResNet50 2d": (monai("SEResNet50", 2), (1, 1, 96, 80)),
    "SEResNext50 3d": (monai("SEResNext50", 3), (1, 1, 40, 32, 36)),
}


def reference(splits, shape, dtype, tile, dev, training, rates):
    """The old way: every pass and class predicted with byte-counting rates."""
    return predict.predict_splits(
        splits, shape, dtype, tile, dev, training, shared={"rates": bytes_only(rates)}
    )


def passes_read_off(splits, shape, dtype, tile, dev, training, rates) -> int:
    """How many passes read their peak off a tile; each such tile's walk (alone) checked against the
    pass's prediction."""
    dev, rates = get_device(dev), bytes_only(rates)
    on_device, gpu, read = dev.name == "cpu", dev.name != "cpu", 0
    for k, s in enumerate(splits):
        lay = layout(s, shape, tile_of(tile, k))
        cg, copy, index = least._held(s, lay, training, gpu, rates, on_device)
        if index is None:
            continue
        one = walk(s, *tile_at(s, lay, index), dtype, rates, training, False, copy)
        parts = predict._memory(s, dtype, TileWalk(peak=one.peak, peak_train=one.peak_train), cg.tiles, training,
                                gpu)  # fmt: skip
        want = predict._predict_pass(s, shape, dtype, lay, dev, rates, training, False, on_device)
        assert (sum(v for _, v in parts), parts) == (want.memory, want.memory_parts), (k, tile)
        read += 1
    return read


def check(splits, shape, dev, training) -> int:
    """Every candidate's memory prediction equals the reference's; the passes read off a tile."""
    dtype, read = torch.float32, 0
    rates = predict._setting(dev, dtype, None, {})[1]
    for tile in candidates(splits, shape):
        want = reference(splits, shape, dtype, tile, dev, training, rates)
        got = least.memory_prediction(splits, shape, dtype, tile, dev, training, {"rates": bytes_only(rates)})
        assert (got.memory, got.memory_parts, got.tile) == (want.memory, want.memory_parts, want.tile), tile
        read += passes_read_off(splits, shape, dtype, tile, dev, training, rates)
    return read


def old_least(splits, input_shape, dtype, dev, training, tried, bounds, shared):
    """``search.least_prediction`` as it was: each tile predicted whole, counting bytes."""
    least_p = min(tried, key=lambda p: p.memory, default=None)
    done = {p.tile for p in tried}
    memory_only = {"rates": bytes_only(predict._setting(dev, dtype, None, shared)[1])}
    for tile in sorted(bounds, key=lambda t: (bounds[t], -math.prod(t))):
        if least_p is not None and bounds[tile] >= least_p.memory:
            break
        if tile not in done:
            p = predict.predict_splits(splits, input_shape, dtype, tile, dev, training, shared=memory_only)
            least_p = p if least_p is None or p.memory < least_p.memory else least_p
    return least_p


def errors(splits, shape, dev, training, monkeypatch) -> list[str]:
    """``best_tile``'s error under budgets no candidate fits, new and old, as (new, old) texts."""
    dtype = torch.float32
    peaks = [reference(splits, shape, dtype, t, dev, training, predict._setting(dev, dtype, None, {})[1]).memory
             for t in candidates(splits, shape)]  # fmt: skip
    out = []
    for budget in sorted({min(peaks) - 1, min(peaks) // 2}):
        texts = []
        for way in (search_module.least_prediction, old_least):
            monkeypatch.setattr("bigpicture.perf.schedule.least_prediction", way)
            with pytest.raises(TilingError) as error:
                best_tile(splits, shape, budget, dev, dtype, training)
            texts.append(str(error.value))
        out.append(tuple(texts))
    return out


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("net", list(NETS))
def test_the_least_peak_is_the_prediction_of_every_pass(net, device, training, monkeypatch):
    factory, shape = NETS[net]
    torch.manual_seed(0)
    splits = analyse(factory().eval(), shape)
    read = check(splits, shape, device, training)
    if training or device != "cpu":  # not vacuous: passes are read off a tile (a CPU inference never is)
        assert read > 0
    for new, old in errors(splits, shape, device, training, monkeypatch):
        assert new == old


def test_the_early_peak_network_peaks_in_its_first_pass():
    """Not vacuous: at some candidate the first of the early-peak network's passes holds the peak."""
    factory, shape = NETS["early peak"]
    torch.manual_seed(0)
    splits, dev = analyse(factory().eval(), shape), get_device("H100-SXM")
    rates = bytes_only(predict._setting(dev, torch.float32, None, {})[1])
    firsts = 0
    for tile in candidates(splits, shape):
        memories = [predict._predict_pass(s, shape, torch.float32, layout(s, shape, tile), dev, rates, True, False,
                                          False).memory for s in splits]  # fmt: skip
        firsts += memories[0] > max(memories[1:])
    assert len(splits) == 2 and firsts > 0


@given(blueprints(nd=2, dag=True, max_steps=5), st.sampled_from(DEVICES), st.booleans())
@examples(30)
def test_random_networks_least_peak_is_the_prediction_of_every_pass(blueprint, device, training):
    torch.manual_seed(0)
    model, shape = blueprint.build().float().eval(), (1,) + tuple(blueprint.input_shape[1:])
    check(analyse(model, shape), shape, device, training)


def test_equal_peaks_name_the_first_pass(monkeypatch):
    """Passes of equal peaks: the first one's parts are named, as ``predict._combine`` names them."""
    factory, shape = NETS["twin squeezes"]
    torch.manual_seed(0)
    splits, dev = analyse(factory().eval(), shape), get_device("H100-SXM")
    rates = predict._setting(dev, torch.float32, None, {})[1]
    tile = candidates(splits, shape)[0]
    made = []

    def equal(s, *args):  # every pass predicted, at one memory with parts of its own
        p = predict._predict_pass(s, *args)
        made.append(p)
        k = len(made)
        return replace(p, memory=10**9, memory_parts=(("tile working set", 10**9 - k), ("pass", k)))

    monkeypatch.setattr(least, "_held", lambda *args: (None, None, None))
    monkeypatch.setattr(least, "_predict_pass", equal)
    got = least.memory_prediction(splits, shape, torch.float32, tile, dev, True, {"rates": bytes_only(rates)})
    assert len(made) == len(splits) == 3
    assert got.memory_parts == (("tile working set", 10**9 - 1), ("pass", 1))
    assert got.memory_parts == predict._combine([replace(p, memory=10**9, memory_parts=(
        ("tile working set", 10**9 - k), ("pass", k))) for k, p in enumerate(made, 1)]).memory_parts  # fmt: skip
