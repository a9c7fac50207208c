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
    total = 0
    for t in _tensors(y):
        if t.is_floating_point():
            w = torch.linspace(-1, 1, t.numel(), dtype=t.dtype).reshape(t.shape)
            total = total + (t * w).sum() + 0.5 * t.square().sum()
    return total


def _tensors(y) -> list:
    """The tensors of a model's output (a tensor, or dicts, lists and tuples of them), in order."""
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (tuple, list)):
        return [t for v in y for t in _tensors(v)]
    return [y] if isinstance(y, torch.Tensor) else []


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
    if isinstance(expected, (tuple, list, dict)):  # the model's own containers, item by item
        assert type(got) is type(expected), f"{what}: a {type(got).__name__}, not a {type(expected).__name__}"
        assert len(got) == len(expected), f"{what}: {len(got)} items, not {len(expected)}"
        if isinstance(expected, dict):
            assert list(got) == list(expected), f"{what}: keys {list(got)}, not {list(expected)}"
        for k in expected if isinstance(expected, dict) else range(len(expected)):
            _compare(got[k], expected[k], f"{what}[{k!r}]", **kw)
        return
    torch.testing.assert_close(got, expected, msg=lambda m: f"{what}: {m}", **kw)
