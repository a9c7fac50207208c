import resource
import time

import pytest
import torch
from torch import nn

from bigpicture.errors import TilingError
from bigpicture.perf.cost import Cost, activation_bytes, count
from bigpicture.perf.devices import Device


def out_size(size: int, k: int, stride: int = 1, pad: int = 0, dilation: int = 1) -> int:
    return (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


CONV2D = {  # name: (N, Cin, Cout, H, W, k, stride, pad, groups, dilation)
    "3x3": (2, 3, 8, 17, 23, 3, 1, 1, 1, 1),
    "strided": (1, 4, 6, 32, 31, 5, 2, 2, 1, 1),
    "grouped": (3, 8, 12, 16, 16, 3, 1, 0, 4, 1),
    "depthwise": (1, 16, 16, 20, 20, 3, 1, 1, 16, 1),
    "dilated": (1, 4, 4, 30, 30, 3, 1, 0, 1, 3),
    "1x1": (2, 64, 32, 7, 9, 1, 1, 0, 1, 1),
}


@pytest.mark.parametrize("n, cin, cout, h, w, k, s, p, g, d", CONV2D.values(), ids=list(CONV2D))
def test_conv2d_flops(n, cin, cout, h, w, k, s, p, g, d):
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g, dilation=d)
    expected = 2 * n * cout * out_size(h, k, s, p, d) * out_size(w, k, s, p, d) * cin // g * k * k
    assert count(conv, (n, cin, h, w)).total.flops == expected


def test_conv3d_flops():
    conv = nn.Conv3d(2, 5, 3, stride=(1, 2, 2), padding=1)
    d, h, w = 9, out_size(16, 3, 2, 1), out_size(15, 3, 2, 1)
    assert count(conv, (2, 2, 9, 16, 15)).total.flops == 2 * 2 * 5 * d * h * w * 2 * 27


def test_transposed_conv_flops():
    # every input pixel scatters Cout/groups x k x k multiply-adds
    conv = nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1, groups=2)
    c = count(conv, (2, 6, 10, 12))
    assert c.total.flops == 2 * 2 * 6 * 10 * 12 * (4 // 2) * 4 * 4
    assert c.output_shapes == ((2, 4, 20, 24),)


def test_linear_flops():
    assert count(nn.Linear(10, 7), (5, 3, 10)).total.flops == 2 * 15 * 10 * 7


def test_training_counts_the_backward():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    first, second = 2 * 8 * 14 * 14 * 3 * 9, 2 * 4 * 12 * 12 * 8 * 9
    c = count(net, (1, 3, 16, 16), training=True)
    assert c.forward.flops == first + second
    # the first conv needs no gradient for the input, only for its weight
    assert c.backward.flops == 2 * second + first
    assert c.total == c.forward + c.backward
    assert {r.phase for r in c.records} == {"forward", "backward"}
    assert {r.name for r in c.records if r.op.startswith("aten.convolution_backward")} == {
        "Sequential.0",
        "Sequential.2",
    }


@pytest.mark.parametrize("dtype, itemsize", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float64, 8)])
def test_bytes_of_a_pointwise_op(dtype, itemsize):
    (relu,) = count(nn.ReLU(), (2, 3, 4, 5), dtype=dtype).records
    assert relu.op == "aten.relu.default" and relu.output_shape == (2, 3, 4, 5)
    assert relu.bytes_read == relu.bytes_written == 120 * itemsize
    assert relu.cost == Cost(0, 120 * itemsize, 120 * itemsize, launches=1)


def test_bytes_of_a_conv_read_input_weight_and_bias():
    (conv,) = count(nn.Conv2d(3, 8, 3), (1, 3, 10, 10)).records
    assert conv.bytes_read == 4 * (3 * 10 * 10 + 8 * 3 * 9 + 8)
    assert conv.bytes_written == 4 * 8 * 8 * 8


def test_views_are_free():
    assert count(nn.Flatten(), (2, 3, 4)).records == ()


def test_the_users_module_is_untouched():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    count(net, (2, 3, 8, 8), training=True)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_module_on_the_meta_device():
    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    assert count(net, (1, 3, 8, 8), training=True).total.flops > 0


def test_value_dependent_op_is_a_tiling_error():
    class Positive(nn.Module):
        def forward(self, x):
            return x[x > 0]

    with pytest.raises(TilingError, match="nonzero"):
        count(Positive(), (4, 4))


def test_whole_slide_counts_without_allocating():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    side = 100_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    c = count(net, (1, 3, side, side), dtype=torch.bfloat16, training=True)
    saved = activation_bytes(net, (1, 3, side, side), dtype=torch.bfloat16)
    assert time.perf_counter() - start < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 500 * 1024
    conv = 2 * 16 * side * side * 3 * 9
    assert c.forward.flops == conv and c.backward.flops == conv
    assert c.records[0].bytes_written == 2 * 16 * side * side
    # the conv saves the input, the ReLU its output
    assert saved == 2 * 3 * side * side + 2 * 16 * side * side


def test_activation_bytes_count_each_storage_once():
    # the ReLU output is saved twice (by the ReLU and by the next conv) but stored once
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    assert activation_bytes(net, (2, 3, 10, 10)) == 4 * 2 * (3 + 8) * 10 * 10


def test_cost_arithmetic():
    a, b = Cost(10, 20, 30, 1), Cost(1, 2, 3, 4)
    assert a + b == Cost(11, 22, 33, 5)
    assert 3 * a == a * 3 == a + a + a
    assert a.bytes == 50 and sum([a, b], Cost()) == a + b
    with pytest.raises(TypeError):
        a * 1.5


def test_roofline():
    device = Device("toy", 2**30, 100.0, {"fp32": 1000.0, "bf16": 4000.0}, 0.5, "a test")
    assert Cost(flops=2000, bytes_read=100).time_on(device) == pytest.approx(2.0)  # compute-bound
    assert Cost(flops=2000, bytes_read=100).time_on(device, torch.bfloat16) == pytest.approx(1.0)  # memory
    assert Cost(flops=2000).time_on(device, efficiency=0.5) == pytest.approx(4.0)
    assert Cost(bytes_written=100, launches=3).time_on(device) == pytest.approx(1.0 + 1.5)
