"""MONAI networks in eval mode: tiled equals untiled, forward and backward; global ones are refused."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_tiled_matches

import bigpicture as bp

nets = pytest.importorskip("monai.networks.nets")

# name: (factory, input shape, tile); small widths keep CI fast, the structure is MONAI's own.
LOCAL = {
    "DenseNet121_2d": (lambda: nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=2), (1, 3, 64, 72), 32),
    "resnet18_2d": (lambda: nets.resnet18(spatial_dims=2, n_input_channels=3, num_classes=2), (1, 3, 64, 72), 32),
    "resnet50_2d": (lambda: nets.resnet50(spatial_dims=2, n_input_channels=3, num_classes=2), (1, 3, 64, 64), 32),
    "resnet18_3d": (lambda: nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=2), (1, 1, 16, 20, 16), (8, 16, 8)),
    "resnet50_3d": (lambda: nets.resnet50(spatial_dims=3, n_input_channels=1, num_classes=2), (1, 1, 16, 16, 20), (16, 8, 8)),
    "UNet_2d_batch_residual": (
        lambda: nets.UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2, norm="batch"),
        (1, 1, 40, 36), 16,
    ),
    "UNet_3d_batch_residual": (
        lambda: nets.UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2, norm="batch"),
        (1, 1, 16, 20, 12), 8,
    ),
    "DynUNet_2d_batch": (
        lambda: nets.DynUNet(2, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                             norm_name="batch"),
        (1, 1, 32, 36), 16,
    ),
    "DynUNet_3d_batch": (
        lambda: nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                             norm_name="batch"),
        (1, 1, 16, 12, 20), 8,
    ),
}  # fmt: skip


def _randomise_batchnorm(model):
    # Fresh BatchNorm layers are the identity in eval mode; random statistics test them for real.
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_monai_network_tiled_equals_untiled(name):
    factory, shape, tile = LOCAL[name]
    torch.manual_seed(0)
    model = _randomise_batchnorm(factory()).double().eval()
    assert_tiled_matches(model, torch.randn(shape, dtype=torch.float64), tile)


def test_monai_unet_float32_default_tolerance():
    factory, shape, tile = LOCAL["UNet_2d_batch_residual"]
    torch.manual_seed(0)
    assert_tiled_matches(_randomise_batchnorm(factory()).eval(), torch.randn(shape), tile)


GLOBAL = {
    "SegResNet": (lambda: nets.SegResNet(spatial_dims=2, in_channels=1, out_channels=2, init_filters=8),
                  (1, 1, 32, 32), "GroupNorm"),
    "EfficientNetBN": (lambda: nets.EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2,
                                                   in_channels=3, num_classes=2), (1, 3, 64, 64), "sigmoid"),
    "AttentionUnet": (lambda: nets.AttentionUnet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2)),
                      (1, 1, 32, 32), "InstanceNorm2d"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(GLOBAL))
def test_monai_network_with_global_op_is_refused_in_one_pass_naming_the_node(name):
    factory, shape, op = GLOBAL[name]
    net = bp.tiled(factory().eval(), tile=16, multipass=False)  # one pass: the global op is an error
    with pytest.raises(bp.TilingError, match=f"node `.*{op}"):
        net(torch.randn(shape))
