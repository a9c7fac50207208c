"""``bp.from_onnx``: ONNX graphs built here with ``onnx.helper``, tiled, against onnxruntime.

Tolerance against onnxruntime: the default float32 one of ``assert_close`` (rtol 1.3e-6, atol 1e-5).
The two runtimes sum each convolution's K = C_in x k^2 products in different orders (MLAS and
oneDNN block them differently), which changes a float32 sum by about K x 2^-24 of the sum of the
products' magnitudes; with K <= 72 and values of order 1 here that is below 1e-5. The engine's own
exactness is checked apart from the runtimes: the converted module tiled against itself untiled,
in float64, with the default float64 tolerances.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, numpy_helper  # noqa: E402
from onnx import helper as h  # noqa: E402

import bigpicture as bp  # noqa: E402
from bigpicture.onnx import _imports  # noqa: E402

try:
    _imports()  # onnx2torch, with a stand-in for the torchvision it imports and does not need
except ImportError as e:
    pytest.skip(f"bp.from_onnx needs onnx2torch: {e}", allow_module_level=True)


class Graph:
    """An ONNX graph written node by node: random float32 initializers, input `x`, output `y`."""

    def __init__(self, shape, seed: int = 0) -> None:
        self.shape, self.nodes, self.inits = shape, [], []
        self.rng = np.random.default_rng(seed)

    def param(self, name: str, *shape, scale: float = 0.3, offset: float = 0.0) -> str:
        value = (self.rng.standard_normal(shape) * scale + offset).astype(np.float32)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def const(self, name: str, values) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.float32), name))
        return name

    def op(self, kind: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(h.make_node(kind, inputs, [output], **attrs))
        return output

    def model(self, output_shape, opset: int = 17):
        x = h.make_tensor_value_info("x", TensorProto.FLOAT, list(self.shape))
        y = h.make_tensor_value_info(self.nodes[-1].output[0], TensorProto.FLOAT, list(output_shape))
        graph = h.make_graph(self.nodes, "test", [x], [y], self.inits)
        m = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
        m.ir_version = min(m.ir_version, 8)  # readable by the onnxruntime in CI
        onnx.checker.check_model(m)
        return m


def conv_groups_strides_dilations():
    g = Graph((1, 4, 30, 26))
    a = g.op("Conv", ["x", g.param("w1", 6, 2, 3, 3), g.param("b1", 6)], "a", pads=[1, 2, 1, 2], strides=[2, 1],
             dilations=[1, 2], group=2)  # fmt: skip
    b = g.op("Relu", [a], "b")
    g.op("Conv", [b, g.param("w2", 4, 6, 5, 3)], "c", pads=[2, 1, 2, 1], dilations=[2, 1])
    return g.model((1, 4, 15, 26))


def conv_transpose_leaky():
    g = Graph((1, 3, 20, 18))
    a = g.op("Conv", ["x", g.param("w1", 4, 3, 3, 3)], "a", pads=[1, 1, 1, 1], strides=[2, 2])
    b = g.op("LeakyRelu", [a], "b", alpha=0.1)
    g.op(
        "ConvTranspose",
        [b, g.param("w2", 4, 2, 4, 4), g.param("b2", 2)],
        "c",
        strides=[2, 2],
        pads=[1, 1, 1, 1],
    )
    return g.model((1, 2, 20, 18))


def batchnorm_pools():
    g = Graph((1, 3, 32, 28))
    a = g.op("Conv", ["x", g.param("w1", 6, 3, 3, 3)], "a", pads=[1, 1, 1, 1])
    stats = [g.param("gamma", 6, offset=1.0), g.param("beta", 6), g.param("mean", 6),
             g.const("var", np.linspace(0.5, 1.5, 6))]  # fmt: skip
    b = g.op("BatchNormalization", [a, *stats], "b")
    c = g.op("Sigmoid", [b], "c")
    d = g.op("MaxPool", [c], "d", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    g.op("AveragePool", [d], "e", kernel_shape=[2, 2], strides=[2, 2])
    return g.model((1, 6, 8, 7))


def resize_concat_add_mul(mode: str):
    g = Graph((1, 3, 32, 24))
    a = g.op("Relu", [g.op("Conv", ["x", g.param("w1", 4, 3, 3, 3)], "a0", pads=[1, 1, 1, 1])], "a")
    low = g.op("Conv", [a, g.param("w2", 4, 4, 3, 3)], "low", pads=[1, 1, 1, 1], strides=[2, 2])
    extra = {"coordinate_transformation_mode": "half_pixel"} if mode == "linear" else {}
    up = g.op("Resize", [low, "", g.const("scales", [1, 1, 2, 2])], "up", mode=mode, **extra)
    cat = g.op("Concat", [up, a], "cat", axis=1)
    gate = g.op("Sigmoid", [cat], "gate")
    g.op("Add", [g.op("Mul", [gate, cat], "m"), cat], "y")
    return g.model((1, 8, 32, 24))


def upsample_opset9():
    g = Graph((1, 2, 16, 20))
    a = g.op("Conv", ["x", g.param("w1", 3, 2, 3, 3)], "a", pads=[1, 1, 1, 1], strides=[2, 2])
    up = g.op("Upsample", [a, g.const("scales", [1, 1, 2, 2])], "up", mode="nearest")
    g.op("Conv", [up, g.param("w2", 2, 3, 3, 3)], "y", pads=[1, 1, 1, 1])
    return g.model((1, 2, 16, 20), opset=9)


def classifier():
    g = Graph((1, 3, 36, 32))
    a = g.op("Relu", [g.op("Conv", ["x", g.param("w1", 8, 3, 3, 3), g.param("b1", 8)], "a0", pads=[1, 1, 1, 1],
                           strides=[2, 2])], "a")  # fmt: skip
    pooled = g.op("GlobalAveragePool", [a], "pooled")
    flat = g.op("Flatten", [pooled], "flat", axis=1)
    g.op("Gemm", [flat, g.param("wf", 2, 8), g.param("bf", 2)], "y", transB=1)
    return g.model((1, 2))


# name: (graph factory, tile); tiles leave interior tiles and touch every border
CASES = {
    "conv_groups_strides_dilations": (conv_groups_strides_dilations, 8),
    "conv_transpose_leaky_relu": (conv_transpose_leaky, 8),
    "batchnorm_maxpool_averagepool": (batchnorm_pools, 8),
    "resize_nearest_concat_add_mul": (lambda: resize_concat_add_mul("nearest"), 8),
    "resize_linear_concat_add_mul": (lambda: resize_concat_add_mul("linear"), 8),
    "upsample_opset9": (upsample_opset9, 8),
    "globalaveragepool_gemm": (classifier, 12),
}


def _input(model) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(1).standard_normal(dims).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tiled_equals_onnxruntime(name, one_thread, tmp_path):
    factory, tile = CASES[name]
    proto = factory()
    path = tmp_path / f"{name}.onnx"
    onnx.save(proto, path)
    x = _input(proto)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    net = bp.tiled(bp.from_onnx(path), tile=tile)
    with torch.no_grad():
        y = net(torch.from_numpy(x))
    assert len(net.plan.tiles) > 1
    torch.testing.assert_close(y, torch.from_numpy(expected))


@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_module_tiled_equals_untiled_in_float64(name, one_thread):
    factory, tile = CASES[name]
    proto = factory()
    module = bp.from_onnx(proto).double()
    x = torch.from_numpy(_input(proto)).double().requires_grad_()
    net = bp.tiled(module, tile=tile)
    y, expected = net(x), module(x)
    torch.testing.assert_close(y, expected)
    (grad,) = torch.autograd.grad(y.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad)


def test_resize_with_scales_computed_in_the_graph_is_a_clear_error():
    g = Graph((1, 1, 8, 8))
    shape = g.op("Shape", ["x"], "shape")
    scales = g.op("Cast", [g.op("Div", [shape, shape], "ones")], "scales", to=TensorProto.FLOAT)
    g.op("Resize", ["x", "", scales], "y", mode="nearest")
    with pytest.raises(bp.TilingError, match="not constants"):
        bp.from_onnx(g.model((1, 1, 8, 8)))
