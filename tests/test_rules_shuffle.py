"""Pixel (un)shuffle in 1D, 2D and 3D, spelt as torch's op or by hand with view/permute/reshape
(as MONAI's ``pixelshuffle`` does): tiled equals untiled in float64, and a chain that only looks
like one (blocks, not pixels, moved into channels) is not taken for it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_tiled_matches
from test_rules_channels import CONV
from torch import nn

from bigpicture.engine.rules.shuffle import pixel_shuffle_nd, pixel_unshuffle_nd

torch.fx.wrap("pixel_shuffle_nd")  # traced as one call each, as a rewritten chain is
torch.fx.wrap("pixel_unshuffle_nd")


def shuffle_by_hand(x, nd, r):
    """MONAI's pixelshuffle: (N, C r^nd, *S) -> (N, C, *S r), with reshape, permute, reshape."""
    n, c = x.size(0), x.size(1) // r**nd
    size = [x.size(2 + d) for d in range(nd)]
    x = x.reshape(n, c, *([r] * nd), *size)
    order = [0, 1] + [i for d in range(nd) for i in (2 + nd + d, 2 + d)]
    return x.permute(order).reshape(n, c, *[s * r for s in size])


def unshuffle_by_hand(x, nd, r):
    """Space to depth: (N, C, *S r) -> (N, C r^nd, *S), with view, permute, contiguous, view."""
    n, c = x.size(0), x.size(1)
    size = [x.size(2 + d) // r for d in range(nd)]
    x = x.view(n, c, *[v for s in size for v in (s, r)])
    order = [0, 1] + [3 + 2 * d for d in range(nd)] + [2 + 2 * d for d in range(nd)]
    return x.permute(order).contiguous().view(n, c * r**nd, *size)


def blocks_to_channels(x, nd, r):
    """Looks like an unshuffle, but stacks r blocks of each dimension into channels: output pixel i
    comes from input rows i + k S, not from its neighbours. Not a local op: it must not be folded."""
    n, c = x.size(0), x.size(1)
    size = [x.size(2 + d) // r for d in range(nd)]
    x = x.reshape(n, c, *[v for s in size for v in (r, s)])
    order = [0, 1] + [2 + 2 * d for d in range(nd)] + [3 + 2 * d for d in range(nd)]
    return x.permute(order).reshape(n, c * r**nd, *size)


class Around(nn.Module):
    def __init__(self, fn, nd, cin, cmid, cout):
        super().__init__()
        self.fn, self.nd = fn, nd
        self.a, self.b = CONV[nd](cin, cmid, 3, padding=1), CONV[nd](cout, 2, 3, padding=1)

    def forward(self, x):
        return self.b(self.fn(self.a(x), self.nd))


ODD = {1: (2, 3, 13), 2: (1, 3, 7, 9), 3: (1, 3, 5, 6, 4)}
EVEN = {1: (2, 3, 20), 2: (1, 3, 8, 10), 3: (1, 3, 4, 6, 8)}
# name: (fn(y, nd), mid channels, out channels per nd, input shapes, tile, folded into one op?)
CASES = {
    "shuffle_by_hand_x2": (lambda y, nd: shuffle_by_hand(y, nd, 2), 8, lambda nd: 8 // 2**nd, ODD, 3, True),
    "unshuffle_by_hand_x2": (lambda y, nd: unshuffle_by_hand(y, nd, 2), 2, lambda nd: 2 * 2**nd, EVEN, 4, True),
    "shuffle_nd_function_x3": (lambda y, nd: pixel_shuffle_nd(y, (3,) * nd), 27, lambda nd: 27 // 3**nd, ODD, 2,
                               True),
    "unshuffle_then_shuffle": (lambda y, nd: pixel_shuffle_nd(pixel_unshuffle_nd(y, (2,) * nd), (2,) * nd),
                               3, lambda nd: 3, EVEN, 4, True),
    "blocks_are_not_pixels": (lambda y, nd: blocks_to_channels(y, nd, 2), 2, lambda nd: 2 * 2**nd, EVEN, 4, False),
}  # fmt: skip


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_pixel_shuffle_in_any_dimension(name, nd, one_thread):
    fn, cmid, cout, shapes, tile, folded = CASES[name]
    torch.manual_seed(0)
    model = Around(fn, nd, 3, cmid, cout(nd)).double()
    net = assert_tiled_matches(model, torch.randn(shapes[nd], dtype=torch.float64), tile)
    roles = list(net.plan.split.roles.values())
    if folded:
        assert roles.count("tail") == 0 and len(net.plan.tiles) > 1, "the chain should be tiled as one op"
    else:
        assert roles.count("tail") > 0, "blocks moved into channels are not a local op"


def test_pixel_shuffle_nd_is_torchs_in_2d():
    x = torch.randn(2, 12, 5, 7)
    torch.testing.assert_close(pixel_shuffle_nd(x, (2, 2)), F.pixel_shuffle(x, 2), rtol=0, atol=0)
    torch.testing.assert_close(pixel_unshuffle_nd(x, (1, 1)), x, rtol=0, atol=0)
    y = torch.randn(1, 3, 6, 8)
    torch.testing.assert_close(pixel_unshuffle_nd(y, (2, 2)), F.pixel_unshuffle(y, 2), rtol=0, atol=0)
    z = torch.randn(1, 2, 4, 6, 9)
    torch.testing.assert_close(
        pixel_shuffle_nd(pixel_unshuffle_nd(z, (2, 3, 3)), (2, 3, 3)), z, rtol=0, atol=0
    )
