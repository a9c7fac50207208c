"""The oracle: a tiled model must equal the untiled one in outputs and every gradient."""

from __future__ import annotations

import torch
from torch import nn

import bigpicture as bp


class Lambda(nn.Module):
    """A module that applies ``fn``: lets tests put plain functions into nn.Sequential."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class ClampSTE(torch.autograd.Function):
    """Clamp forward, identity backward (a straight-through estimator): pointwise, with a gradient that
    autograd of the forward would not give, so a capture that drops the custom backward shows."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(-0.2, 0.2)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _loss(y):
    # A loss whose gradient differs per position, so that a misplaced gradient cannot cancel.
    ys = y if isinstance(y, (tuple, list)) else (y,)
    total = 0
    for t in ys:
        w = torch.linspace(-1, 1, t.numel(), dtype=t.dtype).reshape(t.shape)
        total = total + (t * w).sum() + 0.5 * t.square().sum()
    return total


def assert_tiled_matches(model, x, tile, grads=True, multipass=True, **kw):
    """Outputs, parameter gradients and input gradients of ``bp.tiled(model, tile)`` equal the untiled."""
    net = bp.tiled(model, tile=tile, multipass=multipass)
    x0 = x.detach().clone().requires_grad_(grads)
    x1 = x.detach().clone().requires_grad_(grads)
    expected = model(x0)
    got = net(x1)
    _compare(got, expected, "output", **kw)
    if not grads:
        return net
    params = [p for p in model.parameters() if p.requires_grad]
    g0 = torch.autograd.grad(_loss(expected), [x0] + params, allow_unused=True)
    g1 = torch.autograd.grad(_loss(got), [x1] + params, allow_unused=True)
    names = ["input"] + [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, g1, g0):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, name
            continue
        _compare(a, b, f"gradient of {name}", **kw)
    return net


def _compare(got, expected, what, **kw):
    if isinstance(expected, (tuple, list)):
        assert len(got) == len(expected)
        for i, (a, b) in enumerate(zip(got, expected)):
            _compare(a, b, f"{what}[{i}]", **kw)
        return
    torch.testing.assert_close(got, expected, msg=lambda m: f"{what}: {m}", **kw)
