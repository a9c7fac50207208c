"""Ops that move or resample spatial positions in the middle of a network: slices and crops,
explicit ``F.pad`` in every mode, interpolation to a ``size=``, pixel (un)shuffle, and adaptive
pooling to a fixed size. Tiled equals untiled in float64 in 1D, 2D and 3D, on grids with tiles
at every border and in the interior."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import Lambda, assert_tiled_matches
from test_errors import expect_error
from test_rules_channels import CONV, SHAPES
from torch import nn

LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


class Around(nn.Module):
    """conv -> ``fn(y, nd)`` -> conv: the op stands inside the tiled part."""

    def __init__(self, fn, nd, cout=4):
        super().__init__()
        self.fn, self.nd = fn, nd
        self.a = CONV[nd](3, 4, 3, padding=1)
        self.b = CONV[nd](cout, 2, 3, padding=1)

    def forward(self, x):
        return self.b(self.fn(self.a(x), self.nd))


def pads(nd, *pattern):  # F.pad's pairs, last dimension first, for nd dimensions
    return tuple(pattern[(2 * d) % len(pattern) + k] for d in range(nd) for k in (0, 1))


def each(nd, index):  # the same index on every spatial dimension
    return (slice(None), slice(None)) + (index,) * nd


def size_times(y, nd, num, den=1):
    return [y.size(2 + d) * num // den for d in range(nd)]


class CropSkipUNet(nn.Module):
    """The original UNet: valid convolutions, and the skip connection centre-cropped to the
    upsampled path before concatenation (``x[:, :, d:-d, d:-d]``)."""

    def __init__(self, nd):
        super().__init__()
        conv, convt = CONV[nd], (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 1]
        self.nd = nd
        self.enc = nn.Sequential(conv(3, 4, 3), nn.ReLU(), conv(4, 4, 3), nn.ReLU())
        self.down = nn.Sequential(nn.MaxPool1d(2) if nd == 1 else (nn.MaxPool2d(2) if nd == 2 else nn.MaxPool3d(2)),
                                  conv(4, 6, 3), nn.ReLU())  # fmt: skip
        self.up = convt(6, 4, 2, stride=2)
        self.dec = conv(8, 2, 3)

    def forward(self, x):
        e = self.enc(x)
        u = self.up(self.down(e))
        crop = (slice(None), slice(None)) + (slice(2, -2),) * self.nd  # e is 4 px larger than u per side
        return self.dec(torch.cat([e[crop], u], 1))


# name: (fn(y, nd), output channels)
CASES = {
    "crop_negative_indices": (lambda y, nd: y[each(nd, slice(2, -3))], 4),
    "slice_negative_start_and_stop": (lambda y, nd: y[each(nd, slice(-12, -1))], 4),
    "slice_step_2": (lambda y, nd: y[each(nd, slice(None, None, 2))], 4),
    "slice_start_and_step_3": (lambda y, nd: y[each(nd, slice(1, None, 3))], 4),
    "slice_ellipsis_last_dim": (lambda y, nd: y[..., 1:-1], 4),
    "slice_ellipsis_step": (lambda y, nd: y[..., ::2], 4),
    "slice_channels_and_space": (lambda y, nd: y[:, 1:3, 2:], 2),
    "slice_channel_step": (lambda y, nd: y[:, ::2], 2),
    "pad_constant_value": (lambda y, nd: F.pad(y, pads(nd, 2, 1, 0, 3), value=0.5), 4),
    "pad_negative_crops": (lambda y, nd: F.pad(y, pads(nd, -1, 2, 1, -2)), 4),
    "pad_reflect": (lambda y, nd: F.pad(y, pads(nd, 2, 1, 1, 2), mode="reflect"), 4),
    "pad_replicate": (lambda y, nd: F.pad(y, pads(nd, 3, 1, 0, 2), mode="replicate"), 4),
    "pad_circular": (lambda y, nd: F.pad(y, pads(nd, 1, 2, 2, 0), mode="circular"), 4),
    "pad_modules_and_crop": (lambda y, nd: F.pad(y, pads(nd, 1, 1), mode="circular")[each(nd, slice(1, -2))], 4),
    "interpolate_size_x2_nearest": (lambda y, nd: F.interpolate(y, size=size_times(y, nd, 2)), 4),
    "interpolate_size_x3_linear": (lambda y, nd: F.interpolate(y, size=size_times(y, nd, 3), mode=LINEAR[nd]), 4),
    "interpolate_size_x2_align_corners": (
        lambda y, nd: F.interpolate(y, size=size_times(y, nd, 2), mode=LINEAR[nd], align_corners=True), 4),
    "interpolate_size_x2_nearest_exact": (
        lambda y, nd: F.interpolate(y, size=size_times(y, nd, 2), mode="nearest-exact"), 4),
    "interpolate_size_half_linear": (lambda y, nd: F.interpolate(y, size=size_times(y, nd, 1, 2), mode=LINEAR[nd]), 4),
    "interpolate_size_three_halves": (lambda y, nd: F.interpolate(y, size=size_times(y, nd, 3, 2)), 4),
}  # fmt: skip


# even sizes, so that size= is an integer (or simple) factor of every dimension; with a ratio like
# 29/43 every tile would have to be a multiple of 29 input px: one tile, exact but no tiling
EVEN = {1: ((2, 3, 28), 4), 2: ((1, 3, 16, 14), 4), 3: ((1, 3, 8, 10, 6), 2)}


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_spatial_op_tiled_equals_untiled(name, nd, one_thread):
    fn, cout = CASES[name]
    shape, tile = (EVEN if name.startswith("interpolate") else SHAPES)[nd]
    torch.manual_seed(0)
    net = assert_tiled_matches(Around(fn, nd, cout).double(), torch.randn(shape, dtype=torch.float64), tile)
    assert len(net.plan.tiles) > 1
    assert list(net.plan.split.roles.values()).count("tail") == 0, "the op should be tiled"


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_unet_with_centre_cropped_skip_connections(nd, one_thread):
    shape = {1: (2, 3, 40), 2: (1, 3, 28, 26), 3: (1, 3, 14, 16, 14)}[nd]
    torch.manual_seed(0)
    net = assert_tiled_matches(
        CropSkipUNet(nd).double(), torch.randn(shape, dtype=torch.float64), (8, 6, 4)[nd - 1]
    )
    assert len(net.plan.tiles) > 1


def test_pixel_shuffle_and_unshuffle_functional(one_thread):
    torch.manual_seed(0)

    def fn(y, nd):
        return F.pixel_unshuffle(F.pixel_shuffle(y, 2), 2) + F.pixel_shuffle(F.pixel_unshuffle(y, 2), 2)

    assert_tiled_matches(Around(fn, 2).double(), torch.randn(1, 3, 18, 14, dtype=torch.float64), 4)


def test_pixel_shuffle_of_a_volume_is_a_clear_error():
    # torch's pixel_shuffle shuffles the last two dimensions of any tensor: of a volume, that mixes
    # its depth into channels. The error names the op instead of tiling it wrongly.
    model = Around(lambda y, nd: F.pixel_shuffle(y, 2), 3).double()  # (1, 4, 8, 4, 4) -> (1, 4, 2, 8, 8)
    x = torch.randn(1, 3, 8, 4, 4, dtype=torch.float64)
    expect_error(model, x, 2, "pixel_shuffle", "3D image", "2D images only")


# adaptive pooling: (pool factory per nd, flattened channels x bins)
ADAPTIVE = {
    "avg_to_3": (lambda nd: (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[nd - 1](3), "reduce"),
    "avg_to_mixed_sizes": (lambda nd: (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[nd - 1](
        (5, 1, 4)[:nd] if nd > 1 else 5), "reduce"),
    "avg_functional_to_2": (lambda nd: Lambda(lambda y: (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                                                     F.adaptive_avg_pool3d)[nd - 1](y, 2)), "reduce"),
    "max_to_3": (lambda nd: (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)[nd - 1](3), "tail"),
    "max_with_indices": (lambda nd: Lambda(lambda y: (F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                                                  F.adaptive_max_pool3d)[nd - 1](y, 1, True)[0]), "tail"),
}  # fmt: skip


class PoolHead(nn.Module):
    """Features, adaptive pooling to a fixed size (a global op), then a linear head: the pooling is
    streamed over tiles (average) or runs on the assembled feature map in the untiled tail (max)."""

    def __init__(self, pool, nd, bins):
        super().__init__()
        self.features = nn.Sequential(CONV[nd](3, 4, 3, padding=1), nn.ReLU(), CONV[nd](4, 4, 3, stride=2))
        self.pool, self.head = pool, nn.LazyLinear(2)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_adaptive_pooling_to_a_fixed_size(name, nd, one_thread):
    factory, role = ADAPTIVE[name]
    shape, tile = {1: ((2, 3, 33), 6), 2: ((1, 3, 19, 17), 6), 3: ((1, 3, 11, 12, 10), 4)}[nd]
    torch.manual_seed(0)
    model = PoolHead(factory(nd), nd, 0).double()
    x = torch.randn(shape, dtype=torch.float64)
    model(x)  # materialise the lazy head
    net = assert_tiled_matches(model, x, tile)
    pool = next(n for n in net.plan.split.gm.graph.nodes if "pool" in n.name or "adaptive" in n.name)
    assert net.plan.split.roles[pool] == role
    assert len(net.plan.tiles) > 1


@pytest.mark.parametrize(
    "fn, text",
    [
        (lambda y: y[:, None, :, :, 0].squeeze(1).unsqueeze(-1) * y, "[:, None, :, :, 0]"),
        (lambda y: y[:, :, 2][:, :, None], "[:, :, 2]"),
        (lambda y: y[..., torch.tensor([0, 2])].mean(-1, keepdim=True) * y, "[..., tensor]"),
    ],
)
def test_indexing_that_changes_the_layout_is_a_clear_error(fn, text):
    model = Around(lambda y, nd: fn(y), 2).double()
    expect_error(model, torch.randn(1, 3, 12, 12, dtype=torch.float64), 4, f"indexing {text}", "slices")
