"""Ops over channels (repeat, expand, narrow, flip, permute, comparisons, where, norms, einsum):
tiled equals untiled in float64 in 1D, 2D and 3D, and acting on a spatial dimension is a clear
``TilingError``. Every case runs between two convolutions, on grids with tiles at every border
and in the interior."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_tiled_matches
from test_errors import expect_error
from torch import nn

import bigpicture as bp

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
# input shape and tile per number of spatial dimensions: at least 3 tiles per dimension
SHAPES = {1: ((2, 3, 29), 6), 2: ((1, 3, 17, 15), 5), 3: ((1, 3, 9, 10, 8), 3)}
SPACE = "xyz"


class Around(nn.Module):
    """conv (3 -> 4) -> ``fn(y, self)`` -> conv (``cout`` -> 2): the op stands inside the tiled part."""

    def __init__(self, fn, nd, cout=4):
        super().__init__()
        self.fn, self.nd = fn, nd
        self.a = CONV[nd](3, 4, 3, padding=1)
        self.w = nn.Parameter(torch.randn(4, 4))
        self.shuffle = nn.ChannelShuffle(4)
        self.b = CONV[nd](cout, 2, 3, padding=1)

    def forward(self, x):
        return self.b(self.fn(self.a(x), self))


def ones(m, *lead):  # 1 for every spatial dimension
    return (*lead, *(1,) * m.nd)


def keep(m, *lead):  # -1 (keep) for every spatial dimension
    return (*lead, *(-1,) * m.nd)


def letters(m):
    return SPACE[: m.nd]


def chunk_and_split(y):
    a, b = y.chunk(2, dim=1)
    c, d = torch.split(y, [3, 1], 1)
    return torch.cat([b, a, c, d], 1)


# name: (fn(y, module), output channels)
CASES = {
    "repeat_channels": (lambda y, m: y.repeat(*ones(m, 1, 2)), 8),
    "repeat_tuple": (lambda y, m: y.repeat(ones(m, 1, 3)), 12),
    "tile": (lambda y, m: torch.tile(y, ones(m, 1, 2)), 8),
    "tile_method_short_dims": (lambda y, m: y[:, :2].tile((2,) + (1,) * m.nd), 4),
    "repeat_interleave": (lambda y, m: torch.repeat_interleave(y, 2, dim=1), 8),
    "repeat_interleave_method": (lambda y, m: y[:, :2].repeat_interleave(2, 1), 4),
    "expand_channels": (lambda y, m: y[:, :1].expand(*keep(m, -1, 4)), 4),
    "expand_whole_sizes": (lambda y, m: y[:, 1:2].expand(y.size(0), 3, *[y.size(2 + d) for d in range(m.nd)]), 3),
    "expand_as": (lambda y, m: y[:, :1].expand_as(y) * y, 4),
    "broadcast_to": (lambda y, m: torch.broadcast_to(y[:, 2:3], y.shape), 4),
    "narrow_channels": (lambda y, m: torch.cat([y.narrow(1, 1, 3), torch.narrow(y, 1, 0, 1)], 1), 4),
    "narrow_spatial_negative_start": (lambda y, m: y.narrow(-1, -4, 3), 4),
    "chunk_and_split": (lambda y, m: chunk_and_split(y), 8),
    "channel_shuffle": (lambda y, m: F.channel_shuffle(y, 2) + m.shuffle(y), 4),
    "flip_channels": (lambda y, m: torch.flip(y, [1]) + y.flip(dims=(1,)) * y, 4),
    "permute_identity": (lambda y, m: y.permute(*range(2 + m.nd)) + torch.transpose(y, 1, 1), 4),
    "where_and_comparisons": (lambda y, m: torch.where(y > 0, y, 0.1 * y) + (y <= 0.5).to(y.dtype), 4),
    "where_scalar_and_logical": (
        lambda y, m: torch.where(torch.logical_and(y.gt(-1), y < 1), y, 0.0) * y.ge(0) + (y == y).double(),
        4,
    ),  # fmt: skip
    "masked_fill_and_ne": (lambda y, m: y.masked_fill(y < -0.3, 2.0) * (y != 0), 4),
    "zeros_like_and_sign": (lambda y, m: torch.zeros_like(y) + torch.sign(y) * y, 4),
    "normalize_channels": (lambda y, m: F.normalize(y, dim=1), 4),
    "normalize_p1_positional": (lambda y, m: F.normalize(y, 1.0, 1), 4),
    "norm_channels": (lambda y, m: y / (1 + y.norm(dim=1, keepdim=True) + torch.linalg.vector_norm(y, 3, 1, True)), 4),
    "einsum_channel_mix": (lambda y, m: torch.einsum(f"nc{letters(m)},dc->nd{letters(m)}", y, m.w), 4),
    "einsum_ellipsis": (lambda y, m: torch.einsum("nc...,dc->nd...", y, m.w), 4),
    "einsum_list_and_product": (lambda y, m: torch.einsum("nc...,nc...->nc...", [y, torch.tanh(y)]), 4),
    "pad_channels_and_batch_with_zeros": (lambda y, m: F.pad(y, (0, 0) * m.nd + (1, 2, 0, 0)), 7),  # MONAI's ChannelPad
    "pad_channels_and_space_value": (lambda y, m: F.pad(y, (2, 1) * m.nd + (1, 1), value=0.5), 6),
    "pad_channels_negative": (lambda y, m: F.pad(y, (0, 1) * m.nd + (-1, 0)), 3),
    "stack_mean_new_first_dim": (lambda y, m: torch.mean(torch.stack([y, y.tanh(), y * y], dim=0), dim=0), 4),
    "stack_split_sum_last_dim": (lambda y, m: torch.sum(torch.stack(y.split(2, dim=1), dim=-1), dim=-1), 2),
    "stack_amax_negative_dim": (lambda y, m: torch.stack([y, -y], 2).amax(dim=-(m.nd + 1)), 4),
    "stack_max_values": (lambda y, m: torch.stack((y, y.sigmoid()), 1).max(1)[0], 4),
    "stack_logsumexp_and_prod": (lambda y, m: torch.logsumexp(torch.stack([y, 2 * y], 0), 0)
                                 + torch.stack([y, y + 1], -1).prod(-1), 4),
}  # fmt: skip


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_channel_op_tiled_equals_untiled(name, nd, one_thread):
    fn, cout = CASES[name]
    shape, tile = SHAPES[nd]
    torch.manual_seed(0)
    model = Around(fn, nd, cout).double()
    net = assert_tiled_matches(model, torch.randn(shape, dtype=torch.float64), tile)
    assert len(net.plan.tiles) >= (3**nd if "spatial" not in name else 2 ** (nd - 1)) and not net.plan.earlier
    roles = net.plan.split.roles
    assert list(roles.values()).count("tail") == 0, "the op should be tiled, not moved to the tail"


@pytest.mark.parametrize("nd", [1, 2])  # torch pads 3 dimensions at most in these modes
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_pad_of_channels_and_space_in_every_mode(mode, nd, one_thread):
    shape, tile = SHAPES[nd]
    torch.manual_seed(0)
    model = Around(lambda y, m: F.pad(y, (2, 1) * nd + (1, 2), mode=mode), nd, 7).double()
    net = assert_tiled_matches(model, torch.randn(shape, dtype=torch.float64), tile)
    assert len(net.plan.tiles) >= 3**nd and "tail" not in net.plan.split.roles.values()


def test_permute_of_a_spatial_dimension_ends_the_tiled_part_and_stays_exact(one_thread):
    """Channels-last heads (``permute(0, 2, 3, 1)`` then Linear over channels): the feature map is
    assembled and the rest runs untiled; exact, and the plan says so."""

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    torch.manual_seed(0)
    net = assert_tiled_matches(ChannelsLast().double(), torch.randn(1, 3, 13, 11, dtype=torch.float64), 4)
    assert (
        "untiled nodes after them" in str(net.plan) and net.plan.split.roles[net.plan.sinks[0]] == "spatial"
    )


def wrap(fn):
    return Around(fn, 2).double()


def image():
    return torch.randn(1, 3, 12, 12, dtype=torch.float64)


SPATIAL = {
    "repeat_spatial": (lambda y, m: y.repeat(1, 1, 2, 1), ["node `repeat`", "Tensor.repeat", "repeats", "[2]"]),
    "tile_spatial": (lambda y, m: torch.tile(y, (1, 2)), ["node `tile`", "torch.tile", "repeats", "[3]"]),
    "repeat_interleave_spatial": (lambda y, m: y.repeat_interleave(2, dim=-1), ["Tensor.repeat_interleave", "[3]"]),
    "repeat_interleave_flat": (lambda y, m: torch.repeat_interleave(y, 2).view(1, 4, 24, 12)[:, :, ::2],
                               ["torch.repeat_interleave", "flattens"]),
    "flip_spatial": (lambda y, m: torch.flip(y, [1, 2]), ["node `flip`", "torch.flip", "reverses", "[2]"]),
    "flip_spatial_method": (lambda y, m: y.flip(-1), ["node `flip`", "Tensor.flip", "reverses", "[3]"]),
    "expand_spatial": (lambda y, m: y[:, :, :1].expand(-1, -1, 12, -1), ["node `expand`", "broadcasts", "[2]"]),
    "normalize_spatial": (lambda y, m: F.normalize(y, dim=2), ["node `normalize`", "F.normalize", "dim=1"]),
    "norm_all": (lambda y, m: y / y.norm(), ["node `norm`", "Tensor.norm", "whole image"]),
    "einsum_contracts_space": (lambda y, m: torch.einsum("nchw,nchw->nc", y, y)[:, :, None, None] * y,
                               ["node `einsum`", "einsum", "spatial index"]),
    "einsum_transposes_space": (lambda y, m: torch.einsum("nchw->ncwh", y), ["einsum", "'h' of operand 0"]),
    "stack_not_reduced": (lambda y, m: torch.stack([y[:, :2], y[:, 2:]], 1).flatten(1, 2), ["node `stack`", "torch.stack",
                                                                               "new dimension", "torch.cat"]),
    "stack_reduced_elsewhere": (lambda y, m: torch.stack([y, y], 0).sum(1), ["torch.stack(..., dim=0)", "sum",
                                                                             "stacked dimension alone"]),
    "pad_batch": (lambda y, m: F.pad(y, (0, 0, 0, 0, 0, 0, 1, 0)), ["node `pad`", "changes the layout"]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SPATIAL))
def test_channel_op_on_a_spatial_dimension_is_a_clear_error(name, one_thread):
    fn, fragments = SPATIAL[name]
    message = expect_error(wrap(fn), image(), 4, *fragments)
    assert "channels" in message or "spatial" in message, message


def test_registered_channel_ops_do_not_shadow_each_other():
    """Every key has one rule: the channel rules replaced the old boundary ones for permute."""
    from bigpicture.engine.rules import channels, reduce

    assert bp.rules._RULES["permute"] is channels.permute
    assert bp.rules._RULES[torch.einsum] is channels.einsum
    assert bp.rules._RULES["view"] is reduce.boundary
