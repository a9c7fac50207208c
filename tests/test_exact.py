"""Tiled equals untiled: a named table of cases covering every rule, in 1D, 2D and 3D."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import Lambda, assert_tiled_matches
from torch import nn


class Residual(nn.Module):
    def __init__(self, c, nd=2):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
        self.a = conv(c, c, 3, padding=1)
        self.b = conv(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.b(torch.relu(self.a(x))))


class TinyUNet(nn.Module):
    def __init__(self, nd=2, up="transpose"):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
        convt = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 1]
        self.enc = conv(2, 4, 3, padding=1)
        self.down = conv(4, 8, 3, stride=2, padding=1)
        self.mid = conv(8, 8, 3, padding=1)
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]
        self.up = convt(8, 4, 2, stride=2) if up == "transpose" else nn.Upsample(scale_factor=2, mode=mode)
        self.dec = conv(8 if up == "transpose" else 12, 3, 3, padding=1)

    def forward(self, x):
        e = F.relu(self.enc(x))
        m = F.relu(self.mid(F.relu(self.down(e))))
        u = self.up(m)
        return self.dec(torch.cat([e, u], dim=1))


class Classifier(nn.Module):
    def __init__(self, pool, nd=2):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
        self.features = nn.Sequential(conv(3, 6, 3, stride=2, padding=1), nn.ReLU(), conv(6, 8, 3, padding=1))
        self.pool = pool
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class SplitChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x):
        a, b = torch.chunk(self.conv(x), 2, dim=1)
        c, d = self.conv(x).split([2, 4], dim=1)
        return torch.cat([a * torch.sigmoid(b), c, d[:, 1:3]], 1)


class Arithmetic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        y = self.conv(x)
        return (y * self.scale + 2.0) / 3.0 - y.clamp(-0.5, 0.5) ** 2 + F.softmax(y, dim=1)


class FunctionalConv(nn.Module):
    def __init__(self, padding):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.b = nn.Parameter(torch.randn(4))
        self.padding = padding

    def forward(self, x):
        y = F.conv2d(x, self.w, self.b, stride=1, padding=self.padding, dilation=2)
        return F.max_pool2d(F.relu(y), 3, stride=2, padding=1)


def seq(*layers):
    return nn.Sequential(*layers)


C1, C2, C3 = nn.Conv1d, nn.Conv2d, nn.Conv3d

# name: (model factory, input shape, tile)
CASES = {
    # convolution: kernel, stride, dilation, groups, padding forms and modes
    "conv2d_k3_p1": (lambda: C2(3, 4, 3, padding=1), (2, 3, 23, 31), 8),
    "conv2d_k5_valid": (lambda: C2(3, 4, 5, padding="valid"), (1, 3, 21, 19), 7),
    "conv2d_same_even_kernel": (lambda: C2(3, 4, 4, padding="same"), (1, 3, 20, 17), 6),
    "conv2d_same_dilated": (lambda: C2(3, 4, 3, padding="same", dilation=3), (1, 3, 22, 25), 8),
    "conv2d_stride2_odd": (lambda: C2(3, 4, 3, stride=2, padding=1), (1, 3, 25, 27), 8),
    "conv2d_stride3_k5_tile_not_multiple": (lambda: C2(3, 4, 5, stride=3, padding=2), (1, 3, 29, 31), 7),
    "conv2d_groups": (lambda: C2(4, 8, 3, padding=1, groups=4), (1, 4, 17, 18), 5),
    "conv2d_asym_tuple_padding": (lambda: C2(3, 4, (3, 5), padding=(0, 2), stride=(1, 2)), (1, 3, 16, 23), 6),
    "conv2d_reflect": (lambda: C2(3, 4, 5, padding=2, padding_mode="reflect"), (1, 3, 19, 21), 6),
    "conv2d_replicate": (lambda: C2(3, 4, 3, padding=2, padding_mode="replicate", dilation=2), (1, 3, 18, 15), 5),
    "conv2d_circular": (lambda: C2(3, 4, 3, padding=1, padding_mode="circular"), (1, 3, 16, 19), 6),
    "conv2d_tile_smaller_than_rf": (lambda: seq(*[C2(3, 3, 5, padding=2) for _ in range(4)]), (1, 3, 24, 20), 3),
    "conv1d_stride_dilation": (lambda: seq(C1(2, 3, 5, padding=4, dilation=2), C1(3, 3, 3, stride=2)), (2, 2, 47), 9),
    "conv3d_stride2": (lambda: seq(C3(1, 3, 3, padding=1), nn.ReLU(), C3(3, 2, 3, stride=2, padding=1)), (1, 1, 13, 11, 12), 6),
    "conv3d_reflect_anisotropic_tile": (lambda: C3(2, 2, 3, padding=1, padding_mode="reflect"), (1, 2, 9, 10, 11), (4, 5, 3)),
    "functional_conv_and_pool": (lambda: FunctionalConv(2), (1, 3, 21, 22), 8),
    "functional_conv_same": (lambda: FunctionalConv("same"), (1, 3, 19, 20), 7),
    # transposed convolution
    "convT2d_k2_s2": (lambda: nn.ConvTranspose2d(3, 4, 2, stride=2), (1, 3, 9, 11), 4),
    "convT2d_k3_s2_p1_outpad1": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (1, 3, 9, 10), 3),
    "convT2d_k4_s3_dilation_groups": (lambda: nn.ConvTranspose2d(4, 4, 4, stride=3, padding=2, dilation=2, groups=2), (1, 4, 8, 9), 3),
    "convT1d_k5_s2_p2": (lambda: nn.ConvTranspose1d(2, 3, 5, stride=2, padding=2, output_padding=1), (2, 2, 19), 4),
    "convT3d_k2_s2": (lambda: nn.ConvTranspose3d(2, 2, 3, stride=2, padding=1), (1, 2, 5, 6, 7), 3),
    # pooling
    "maxpool2d_k3_s2_p1": (lambda: nn.MaxPool2d(3, 2, 1), (1, 3, 21, 24), 6),
    "maxpool2d_ceil_mode": (lambda: seq(C2(3, 3, 1), nn.MaxPool2d(3, 2, ceil_mode=True)), (1, 3, 20, 23), 6),
    "maxpool2d_dilation": (lambda: nn.MaxPool2d(3, 1, padding=1, dilation=2), (1, 3, 15, 14), 5),
    "maxpool1d_ceil": (lambda: nn.MaxPool1d(2, ceil_mode=True), (1, 3, 31), 6),
    "maxpool3d": (lambda: seq(C3(1, 2, 1), nn.MaxPool3d(2, 2)), (1, 1, 9, 10, 11), 4),
    "avgpool2d_count_include_pad": (lambda: seq(C2(3, 3, 1), nn.AvgPool2d(3, 2, 1)), (1, 3, 19, 22), 6),
    "avgpool2d_exclude_pad_ceil": (lambda: seq(C2(3, 3, 1), nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)), (1, 3, 20, 21), 6),
    "avgpool2d_divisor_override": (lambda: seq(C2(3, 3, 1), nn.AvgPool2d(2, divisor_override=3)), (1, 3, 14, 16), 4),
    "avgpool1d_pad": (lambda: seq(C1(3, 3, 1), nn.AvgPool1d(3, 2, 1, count_include_pad=False)), (1, 3, 25), 6),
    "avgpool3d_ceil": (lambda: seq(C3(1, 2, 1), nn.AvgPool3d(3, 2, 1, ceil_mode=True)), (1, 1, 9, 8, 11), 4),
    # resampling
    "upsample_nearest_x2": (lambda: seq(C2(3, 3, 3, padding=1), nn.Upsample(scale_factor=2)), (1, 3, 9, 11), 4),
    "upsample_nearest_x3_size": (lambda: seq(C2(3, 3, 1), Lambda(lambda x: F.interpolate(x, size=(27, 30)))), (1, 3, 9, 10), 4),
    "upsample_nearest_exact": (lambda: seq(C2(3, 3, 1), nn.Upsample(scale_factor=3, mode="nearest-exact")), (1, 3, 7, 8), 3),
    "upsample_bilinear": (lambda: seq(C2(3, 3, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear")), (1, 3, 10, 9), 4),
    "upsample_bilinear_align_corners": (lambda: seq(C2(3, 3, 1), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)), (1, 3, 11, 9), 4),
    "upsample_linear_1d_x3": (lambda: seq(C1(2, 2, 1), nn.Upsample(scale_factor=3, mode="linear")), (1, 2, 13), 4),
    "upsample_trilinear_align_corners": (lambda: seq(C3(1, 2, 1), nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True)), (1, 1, 5, 6, 4), 3),
    "pixel_shuffle": (lambda: seq(C2(3, 8, 3, padding=1), nn.PixelShuffle(2), C2(2, 2, 3, padding=1)), (1, 3, 9, 10), 4),
    "pixel_unshuffle": (lambda: seq(C2(3, 2, 3, padding=1), nn.PixelUnshuffle(2), C2(8, 2, 3, padding=1)), (1, 3, 12, 14), 4),
    # pointwise
    "activations": (lambda: seq(C2(3, 6, 3, padding=1), nn.LeakyReLU(0.1), nn.GELU(), nn.SiLU(), nn.ELU(), nn.Tanh(), nn.Sigmoid(), nn.PReLU(6), nn.Softmax(dim=1)), (1, 3, 13, 14), 5),
    "batchnorm_eval": (lambda: seq(C2(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), C2(4, 4, 3, padding=1), nn.BatchNorm2d(4)).eval(), (2, 3, 15, 16), 5),
    "instancenorm_running_stats_eval": (lambda: seq(C2(3, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True, track_running_stats=True)).eval(), (1, 3, 12, 13), 5),
    "dropout_eval": (lambda: seq(C2(3, 4, 3, padding=1), nn.Dropout2d(0.5), C2(4, 4, 3, padding=1)).eval(), (1, 3, 14, 11), 5),
    "arithmetic_scalars_per_channel": (lambda: Arithmetic(), (1, 3, 13, 15), 5),
    # graph structure
    "residual": (lambda: seq(C2(3, 4, 3, padding=1), Residual(4), Residual(4)), (1, 3, 17, 19), 6),
    "residual_3d": (lambda: seq(C3(1, 2, 3, padding=1), Residual(2, 3)), (1, 1, 8, 9, 7), 4),
    "split_and_concat_channels": (lambda: SplitChannels(), (1, 4, 13, 12), 5),
    "unet_transpose": (lambda: TinyUNet(2), (1, 2, 20, 22), 8),
    "unet_bilinear": (lambda: TinyUNet(2, up="upsample"), (1, 2, 18, 22), 6),
    "unet_1d": (lambda: TinyUNet(1), (2, 2, 30), 8),
    "unet_3d_trilinear": (lambda: TinyUNet(3, up="upsample"), (1, 2, 8, 10, 6), 4),
    "pad_and_crop": (lambda: seq(C2(3, 3, 3), nn.ZeroPad2d((1, 2, 0, 3)), nn.ReflectionPad2d(2), Lambda(lambda x: x[:, :, 2:-1, 1:]), nn.ReplicationPad2d((0, 1, 2, 0))), (1, 3, 14, 13), 5),
    "functional_pad_circular_and_strided_slice": (lambda: seq(C2(3, 3, 1), Lambda(lambda x: F.pad(x, (2, 1, 1, 2), mode="circular")[:, :, ::2, 1::3])), (1, 3, 14, 16), 6),
    # streamed reductions, then an untiled head
    "global_avg_pool_head": (lambda: Classifier(nn.AdaptiveAvgPool2d(1)), (2, 3, 27, 25), 8),
    "global_max_pool_head": (lambda: Classifier(nn.AdaptiveMaxPool2d((1, 1))), (2, 3, 27, 25), 8),
    "mean_spatial_dims": (lambda: Classifier(Lambda(lambda x: x.mean((2, 3), keepdim=True))), (1, 3, 21, 26), 8),
    "sum_and_amax": (lambda: Classifier(Lambda(lambda x: x.sum(dim=(-1, -2)) + torch.amax(x, dim=(2, 3)))), (1, 3, 19, 24), 6),
    "global_avg_pool_3d": (lambda: Classifier(nn.AdaptiveAvgPool3d(1), nd=3), (1, 3, 9, 10, 11), 4),
    "global_max_pool_1d": (lambda: Classifier(nn.AdaptiveMaxPool1d(1), nd=1), (2, 3, 41), 8),
    "mean_over_all_dims": (lambda: seq(C2(3, 4, 3, padding=1), Lambda(lambda x: x.mean())), (1, 3, 15, 16), 5),
    # tiling geometry
    "single_tile_bigger_than_image": (lambda: seq(C2(3, 4, 3, padding=1), nn.MaxPool2d(2)), (1, 3, 10, 12), 64),
    "tile_one_pixel": (lambda: C2(3, 2, 3, padding=1), (1, 3, 5, 6), 1),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tiled_equals_untiled_float64(name):
    factory, shape, tile = CASES[name]
    torch.manual_seed(0)
    model = factory().double()
    x = torch.randn(shape, dtype=torch.float64)
    assert_tiled_matches(model, x, tile)


@pytest.mark.parametrize("name", ["residual", "unet_bilinear", "global_avg_pool_head", "conv2d_reflect", "avgpool2d_exclude_pad_ceil"])
def test_tiled_equals_untiled_float32_default_tolerance(name):
    factory, shape, tile = CASES[name]
    torch.manual_seed(1)
    assert_tiled_matches(factory(), torch.randn(shape), tile)


def test_max_pool_ties_route_gradient_like_untiled():
    # Constant regions make every position a tie; gradients must go where PyTorch sends them.
    model = Classifier(nn.AdaptiveMaxPool2d(1)).double()
    for p in model.features.parameters():
        nn.init.zeros_(p)
    assert_tiled_matches(model, torch.randn(1, 3, 16, 16, dtype=torch.float64), 5)
    model = seq(C2(3, 2, 1), Lambda(lambda x: torch.amax(x, dim=(2, 3)))).double()
    nn.init.zeros_(model[0].weight)
    assert_tiled_matches(model, torch.randn(1, 3, 12, 12, dtype=torch.float64), 5)
