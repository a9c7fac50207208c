"""Background reuse in training: forward and backward of background tiles once per geometry, exact.

Images here are synthetic: a constant background (the value given to ``background=``) with
random "tissue" blobs, so that many interior tiles read only background.
"""

from __future__ import annotations

import pytest
import torch
from helpers import _loss
from torch import nn

import bigpicture as bp


def classifier():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


def mean_classifier():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.GELU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip


def segmenter():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
        nn.Upsample(scale_factor=2), nn.Conv2d(6, 2, 1),
    )  # fmt: skip


CASES = {
    # name: (model, image side, tile, background value)
    "max_head_zero_background": (classifier, 96, 8, 0.0),
    "mean_head_white_background": (mean_classifier, 80, 8, 1.0),
    "dense_output": (segmenter, 88, 8, 0.0),
    "per_channel_background": (segmenter, 72, 8, (0.9, 0.8, 0.95)),
}


def image(side: int, value, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(1, 3, side, side, dtype=torch.float64)
    x[:] = (
        torch.as_tensor(value, dtype=torch.float64).reshape(-1, 1, 1) if isinstance(value, tuple) else value
    )
    for _ in range(3):  # tissue blobs, one touching the border
        y0, x0 = torch.randint(0, side - 12, (2,), generator=g).tolist()
        x[:, :, y0 : y0 + 12, x0 : x0 + 12] = torch.rand(1, 3, 12, 12, generator=g, dtype=torch.float64)
    x[:, :, :10, :10] = torch.rand(1, 3, 10, 10, generator=g, dtype=torch.float64)
    return x


@pytest.mark.parametrize("name", CASES)
def test_background_reuse_gives_the_untiled_outputs_and_parameter_gradients(name):
    factory, side, tile, value = CASES[name]
    torch.manual_seed(0)
    model = factory().double().eval()
    x = image(side, value)
    net = bp.tiled(model, tile=tile, background=value)
    expected, got = model(x), net(x)
    torch.testing.assert_close(got, expected)
    params = list(model.parameters())
    g0 = torch.autograd.grad(_loss(expected), params)
    g1 = torch.autograd.grad(_loss(got), params)
    for (n, _), a, b in zip(model.named_parameters(), g1, g0, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, n=n: f"gradient of {n}: {m}")
    stats = net.report
    assert stats.skipped > 0, stats
    assert stats.backward_skipped == stats.skipped, stats  # each reused forward is a saved recompute
    assert stats.computed + stats.skipped == stats.tiles == len(net.plan.tiles)


def test_background_reuse_with_input_gradient_recomputes_every_tile():
    # Input gradients differ per tile, so the backward cannot share; the forward still does.
    factory, side, tile, value = CASES["max_head_zero_background"]
    torch.manual_seed(0)
    model = factory().double().eval()
    x0 = image(side, value).requires_grad_()
    x1 = x0.detach().clone().requires_grad_()
    net = bp.tiled(model, tile=tile, background=value)
    expected, got = model(x0), net(x1)
    params = list(model.parameters())
    g0 = torch.autograd.grad(_loss(expected), [x0] + params)
    g1 = torch.autograd.grad(_loss(got), [x1] + params)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b)
    assert net.report.skipped > 0 and net.report.backward_skipped == 0


def test_background_reuse_trains_like_the_untiled_model():
    torch.manual_seed(0)
    plain = bp.freeze_batchnorm(classifier().double()).train()
    model = bp.freeze_batchnorm(classifier().double()).train()
    model.load_state_dict(plain.state_dict())
    net = bp.tiled(model, tile=8, background=0.0)
    x, labels = image(96, 0.0), torch.tensor([1])
    optims = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, net)]
    for _ in range(3):
        for m, opt in zip((plain, net), optims, strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), labels).backward()
            opt.step()
    for (n, a), b in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, n=n: f"{n}: {m}")
    assert net.report.backward_skipped > 0


def test_a_tile_that_is_not_all_background_is_computed():
    # One pixel off the background value in an otherwise empty image: the tiles reading it compute.
    torch.manual_seed(0)
    model = segmenter().double().eval()
    x = torch.zeros(1, 3, 64, 64, dtype=torch.float64)
    x[0, 1, 30, 33] = 1.0
    net = bp.tiled(model, tile=8, background=0.0)
    torch.testing.assert_close(net(x), model(x))
    reading = [
        t for t in net.plan.tiles if all(lo <= p < hi for lo, hi, p in zip(t.read.lo, t.read.hi, (30, 33)))
    ]
    interior = [t for t in net.plan.tiles if all(lo > 0 and hi < 64 for lo, hi in zip(t.read.lo, t.read.hi))]
    assert reading and 0 < net.report.skipped <= len(interior) - len(reading)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield
