"""The GPU convolution model's assumptions, each checked on its own (`rates.gpu_conv_rate`)."""

import pytest
import torch

from bigpicture.perf.devices import DEVICES
from bigpicture.perf.rates import GPU_CTA_TILE, WINOGRAD_3X3, Rates, quantization

BIG = 256 * 56 * 56  # output positions of a ResNet stage at batch 256: every SM busy


@pytest.mark.parametrize(
    ("positions", "channels", "sms", "expected"),
    [
        (128 * 80, 128, 80, 1.0),  # exactly one full wave of whole tiles
        (64, 128, 80, 0.5 / 80),  # one half-filled tile on one SM of 80
        (128 * 81, 128, 80, 81 / 160),  # one block over a wave: a second, almost empty wave
        (128 * 81, 128, None, 1.0),  # no SM count: tile quantization only
        (100, 100, None, 100 * 100 / (128 * 128)),
        (100, 20, None, 100 * 20 / (128 * 32)),  # few channels: a narrower block
        (128, 64, 1, 1.0),
    ],
)
def test_tile_and_wave_quantization(positions, channels, sms, expected):
    assert GPU_CTA_TILE == (128, 128)
    assert quantization(positions, channels, sms) == pytest.approx(expected)


def test_winograd_only_for_float32_3x3_stride_1_on_cuda_cores():
    v100 = Rates(DEVICES["V100"], torch.float32)  # no TF32: CUDA cores
    direct = v100.conv(2, 256 * 9, 256, BIG, 1, kernel=9, cin=256)
    strided = v100.conv(2, 256 * 9, 256, BIG, 2, kernel=9, cin=256)
    one = v100.conv(2, 256 * 9, 256, BIG, 1, kernel=1, cin=256 * 9)  # the same GEMM as a 1x1
    assert direct == pytest.approx(WINOGRAD_3X3 * one) and strided == pytest.approx(one)
    assert v100.conv(3, 256 * 9, 256, BIG, 1, kernel=9, cin=256) == pytest.approx(one)  # 2D only
    # tensor cores run implicit GEMM: no Winograd for float16 on the same GPU
    half = Rates(DEVICES["V100"], torch.float16, channels_last=True)
    assert half.conv(2, 256 * 9, 256, BIG, 1, kernel=9, cin=256) == pytest.approx(
        half.conv(2, 256 * 9, 256, BIG, 1, kernel=1, cin=256 * 9)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])  # float32: TF32
def test_tensor_core_convolutions_on_nchw_pay_the_transposes(dtype):
    nchw = Rates(DEVICES["A100-80GB"], dtype)
    nhwc = Rates(DEVICES["A100-80GB"], dtype, channels_last=True)
    fan_in, cout, cin = 64, 256, 64  # a 1x1 expansion: little work per byte moved
    flops = 2 * BIG * fan_in * cout
    item = torch.empty((), dtype=dtype).element_size()
    moved = 2 * (cin + cout) * BIG * item
    transposes = moved / nchw.stream("copy", moved)
    assert flops / nchw.conv(2, fan_in, cout, BIG, kernel=1, cin=cin) == pytest.approx(
        flops / nhwc.conv(2, fan_in, cout, BIG, kernel=1, cin=cin) + transposes
    )
    # CUDA cores read NCHW natively: the layout changes nothing
    v100 = Rates(DEVICES["V100"], torch.float32)
    v100_nhwc = Rates(DEVICES["V100"], torch.float32, channels_last=True)
    assert v100.conv(2, fan_in, cout, BIG, kernel=1, cin=cin) == v100_nhwc.conv(
        2, fan_in, cout, BIG, kernel=1, cin=cin
    )


def test_every_table_gpu_knows_its_sms():
    assert all(d.sms and 20 <= d.sms <= 200 for d in DEVICES.values())
    assert DEVICES["A100-80GB"].sms == 108 and DEVICES["H100-SXM"].sms == 132
