"""Tiled equals untiled on random architectures (hypothesis), in float64.

An architecture is a blueprint: plain data (ops, their arguments, which values they read),
so that a failing example prints as a small program. Random *stacks* chain single-input
ops; random *DAGs* add residual blocks, channel concatenations and splits, gates, and
UNet-like down/up paths whose skip connections match in shape. Every op is first run by
PyTorch itself on a zero tensor of its input's shape while the blueprint is drawn, so a
blueprint only holds ops that are valid for the untiled model.

CI runs a fixed set of examples (derandomized). To search for new failures locally::

    BIGPICTURE_FUZZ=500 python -m pytest tests/test_random_architectures.py
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_tiled_matches
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

FUZZ = int(os.environ.get("BIGPICTURE_FUZZ", "0"))


def examples(n: int):
    return settings(
        max_examples=FUZZ or n,
        derandomize=not FUZZ,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


# -- blueprints --------------------------------------------------------------------------------


@dataclass
class Node:
    """``values[k] = op(values[i] for i in inputs)``; ``layer`` names an nn class for "layer" ops."""

    op: str
    inputs: tuple[int, ...]
    layer: str = ""
    kw: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kw.items())
        ins = ", ".join(f"v{i}" for i in self.inputs)
        return f"{self.layer}({args})({ins})" if self.op == "layer" else f"{self.op}({ins}; {args})"


@dataclass
class Blueprint:
    nd: int
    input_shape: tuple[int, ...]  # (N, C, *spatial)
    nodes: list[Node]
    dense: tuple[int, ...]  # values returned as dense maps
    reduce: tuple[int, str, int] | None  # (value, how, channels): a streamed reduction + Linear head, if any
    tile: int | tuple[int, ...]
    seed: int

    def __repr__(self) -> str:
        lines = [f"input v0: {self.input_shape}, tile={self.tile}, seed={self.seed}"]
        lines += [f"v{k + 1} = {node!r}" for k, node in enumerate(self.nodes)]
        dense = ", ".join(f"v{k}" for k in self.dense)
        lines.append(f"return dense=({dense}), reduce={self.reduce}")
        return "\n" + "\n".join(lines)

    def build(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return Net(self).double().eval()


class FConv(nn.Module):
    """A convolution called through ``F.convNd`` (the functional rule)."""

    def __init__(self, cin, cout, kernel_size, nd, stride=1, padding=0, dilation=1, groups=1):
        super().__init__()
        conv = getattr(nn, f"Conv{nd}d")(cin, cout, kernel_size, groups=groups)
        self.weight, self.bias = conv.weight, conv.bias
        self.fn = getattr(F, f"conv{nd}d")
        self.args = (stride, padding, dilation, groups)

    def forward(self, x):
        return self.fn(x, self.weight, self.bias, *self.args)


FUNCTIONS = {
    "relu": torch.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2),
    "tanh": torch.tanh,
    "affine": lambda x: x * 0.5 + 0.25,
    "clamp": lambda x: x.clamp(-0.5, 0.5),
    "softmax_channels": lambda x: F.softmax(x, dim=1),
    # ops over channels (tests/test_rules_channels.py), shape-preserving
    "flip_channels": lambda x: x.flip(1),
    "where_compare": lambda x: torch.where(x > 0.1, x, -0.5 * x) * (x <= 1.5),
    "normalize_channels": lambda x: F.normalize(x, dim=1),
    "repeat_interleave_channels": lambda x: x.repeat_interleave(2, dim=1)[:, 1::2],
    "expand_channel_mean": lambda x: x.mean(1, keepdim=True).expand_as(x) - x,
}


def make_layer(node: Node) -> nn.Module | None:
    if node.op == "layer":
        kw = dict(node.kw)
        if node.layer == "FConv":
            return FConv(**kw)
        return getattr(nn, node.layer)(**kw)
    return None


def apply(node: Node, layer, xs):
    """One op; the same code runs the shape probe and (traced by torch.fx) the model."""
    x, kw = xs[0], node.kw
    if node.op == "layer":
        return layer(x)
    if node.op == "pad":
        value = {"value": kw["value"]} if kw["mode"] == "constant" else {}
        return F.pad(x, kw["pad"], mode=kw["mode"], **value)
    if node.op == "fpool":
        args = {k: v for k, v in kw.items() if k not in ("how", "nd")}
        return getattr(F, f"{kw['how']}_pool{kw['nd']}d")(x, **args)
    if node.op == "interpolate":
        return F.interpolate(x, **kw)
    if node.op == "slice":
        return x[kw["index"]]
    if node.op == "chunk":
        return torch.chunk(x, kw["chunks"], dim=1)
    if node.op == "split":
        return x.split(kw["sizes"], dim=1)
    if node.op == "item":
        return x[kw["k"]]
    if node.op == "fn":
        return FUNCTIONS[kw["name"]](x)
    if node.op == "add":
        return x + xs[1]
    if node.op == "gate":
        return x * torch.sigmoid(xs[1])
    if node.op == "cat":
        return torch.cat(list(xs), dim=1)
    raise AssertionError(node.op)


class Net(nn.Module):
    def __init__(self, blueprint: Blueprint):
        super().__init__()
        self.blueprint = blueprint
        layers = [make_layer(n) for n in blueprint.nodes]
        self.layers = nn.ModuleList(layer or nn.Identity() for layer in layers)
        for m in self.modules():  # nothing trivial about eval-mode statistics
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                with torch.no_grad():
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
        self.pool = self.head = None
        if blueprint.reduce is not None:
            _, how, channels = blueprint.reduce
            self.head = nn.Linear(channels, 3)
            if how in ("AdaptiveAvgPool", "AdaptiveMaxPool"):
                self.pool = getattr(nn, f"{how}{blueprint.nd}d")(1)

    def forward(self, x):
        b = self.blueprint
        values = [x]
        for node, layer in zip(b.nodes, self.layers, strict=True):
            values.append(apply(node, layer, [values[i] for i in node.inputs]))
        outputs = [values[k] for k in b.dense]
        if b.reduce is not None:
            k, how, _ = b.reduce
            y, dims = values[k], tuple(range(2, 2 + b.nd))
            if self.pool is not None:
                r = self.pool(y).flatten(1)
            elif how == "mean":
                r = y.mean(dims, keepdim=True).flatten(1)
            else:
                r = getattr(torch, how)(y, dim=dims)
            outputs.append(self.head(r))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


# -- drawing blueprints ------------------------------------------------------------------------

MAX_CHANNELS = 8
MAX_EXTENT = {1: 160, 2: 48, 3: 14}
MAX_PIXELS = {1: 160, 2: 48 * 48, 3: 14**3}
INPUT_EXTENT = {1: (9, 90), 2: (6, 33), 3: (5, 10)}
MAX_KERNEL = {1: 5, 2: 5, 3: 3}
TILES_PER_DIM = {1: 10, 2: 5, 3: 3}
ACTIVATIONS = "ReLU LeakyReLU GELU SiLU Tanh Sigmoid ELU Hardswish Softplus Identity".split()
LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


class Drawer:
    """Grows a blueprint op by op; each op is probed by PyTorch on a zero tensor and dropped if invalid."""

    def __init__(self, draw, nd, input_shape):
        self.draw, self.nd = draw, nd
        self.nodes: list[Node] = []
        self.shapes: list = [tuple(input_shape[1:])]  # (C, *spatial) per value; None for a tuple
        self.probes: list = [torch.zeros((1,) + self.shapes[0])]  # each value for a batch of 1

    def ints(self, lo, hi):
        return self.draw(st.integers(lo, hi))

    def choice(self, options):
        return self.draw(st.sampled_from(list(options)))

    def coin(self, p=0.5):
        return self.draw(st.integers(0, 99)) < 100 * p

    def pick(self) -> int:
        """A recent tensor value."""
        tensors = [k for k, s in enumerate(self.shapes) if s is not None]
        return tensors[-1 - self.ints(0, min(2, len(tensors) - 1))]

    def add(self, op, inputs, layer="", **kw) -> int | None:
        node = Node(op, tuple(inputs), layer, kw)
        try:
            with torch.no_grad():
                out = apply(node, make_layer(node), [self.probes[i] for i in inputs])
        except (RuntimeError, ValueError):  # invalid for PyTorch itself: not a tiling question
            return None
        if isinstance(out, tuple):
            shape = None
        else:
            shape = tuple(out.shape[1:])
            spatial = shape[1:]
            if (
                min(spatial) < 1
                or max(spatial) > MAX_EXTENT[self.nd]
                or math.prod(spatial) > MAX_PIXELS[self.nd]
            ):
                return None
            if shape[0] > 2 * MAX_CHANNELS:
                return None
        self.nodes.append(node)
        self.shapes.append(shape)
        self.probes.append(out)
        return len(self.shapes) - 1

    # -- single-input ops

    def conv(self, i, cout=None, keep_shape=False):
        c, nd = self.shapes[i][0], self.nd
        groups = self.choice([g for g in range(1, c + 1) if c % g == 0]) if self.coin(0.3) else 1
        if cout is None:
            cout = groups * self.ints(1, max(1, MAX_CHANNELS // groups))
        elif cout % groups:
            groups = 1
        k = self.ints(1, MAX_KERNEL[nd])
        stride = 1 if keep_shape else self.choice([1, 1, 2, 3])
        dilation = self.choice([1, 1, 2, 3])
        mode = self.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
        if keep_shape:
            padding = "same"
        elif stride == 1 and self.coin(0.3):
            padding = self.choice(["same", "valid"])
        elif self.coin(0.3):
            padding = tuple(self.ints(0, 3) for _ in range(nd))
        else:
            padding = self.ints(0, 3)
        kw = dict(kernel_size=k, stride=stride, padding=padding, dilation=dilation, groups=groups)
        if mode == "zeros" and self.coin(0.25):
            return self.add("layer", [i], "FConv", cin=c, cout=cout, nd=nd, **kw)
        return self.add(
            "layer",
            [i],
            f"Conv{nd}d",
            in_channels=c,
            out_channels=cout,
            bias=self.coin(0.8),
            padding_mode=mode,
            **kw,
        )

    def conv_transpose(self, i):
        c, nd = self.shapes[i][0], self.nd
        groups = self.choice([g for g in range(1, c + 1) if c % g == 0]) if self.coin(0.3) else 1
        stride, dilation = self.choice([1, 2, 2, 3]), self.choice([1, 1, 2])
        k = self.ints(1, MAX_KERNEL[nd])
        padding = self.ints(0, dilation * (k - 1))
        output_padding = self.ints(0, max(stride, dilation) - 1)
        return self.add(
            "layer",
            [i],
            f"ConvTranspose{nd}d",
            in_channels=c,
            out_channels=groups * self.ints(1, max(1, MAX_CHANNELS // groups)),
            kernel_size=k,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            groups=groups,
            dilation=dilation,
            bias=self.coin(0.8),
        )

    def pool(self, i):
        nd = self.nd
        how = self.choice(["max", "avg"])
        k = self.ints(1, 4)
        kw = dict(
            kernel_size=k,
            stride=self.choice([None, 1, 2, 3]),
            padding=self.ints(0, k // 2),
            ceil_mode=self.coin(),
        )
        if how == "max":
            kw["dilation"] = self.choice([1, 1, 2])
        else:
            kw["count_include_pad"] = self.coin()
            if nd > 1 and self.coin(0.2):
                kw["divisor_override"] = self.ints(1, 5)
        if self.coin(0.3):
            return self.add("fpool", [i], how=how, nd=nd, **kw)
        return self.add("layer", [i], f"{how.capitalize()}Pool{nd}d", **kw)

    def upsample(self, i, factor=None):
        nd = self.nd
        mode = self.choice(["nearest", "nearest-exact", LINEAR_MODE[nd]])
        if factor is None:
            factor = self.ints(2, 3) if self.coin() else tuple(self.ints(1, 3) for _ in range(nd))
        align = self.coin() if mode == LINEAR_MODE[nd] else None
        if self.coin(0.3):
            return self.add("interpolate", [i], scale_factor=factor, mode=mode, align_corners=align)
        return self.add("layer", [i], "Upsample", scale_factor=factor, mode=mode, align_corners=align)

    def resize(self, i, size):
        mode = self.choice(["nearest", LINEAR_MODE[self.nd]])
        align = self.coin() if mode != "nearest" else None
        return self.add("interpolate", [i], size=tuple(size), mode=mode, align_corners=align)

    def pad(self, i, pads=None):
        mode = self.choice(["constant", "reflect", "replicate", "circular"])
        if pads is None:
            low = -2 if mode == "constant" else 0
            pads = tuple(self.ints(low, 3) for _ in range(2 * self.nd))
        if self.coin(0.3):
            name = {
                "constant": "ConstantPad",
                "reflect": "ReflectionPad",
                "replicate": "ReplicationPad",
                "circular": "CircularPad",
            }[mode]
            extra = {"value": 0.5} if mode == "constant" else {}
            return self.add("layer", [i], f"{name}{self.nd}d", padding=pads, **extra)
        return self.add("pad", [i], pad=pads, mode=mode, value=self.choice([0.0, -1.0]))

    def crop(self, i, size=None, step=False):
        extent = self.shapes[i][1:]
        index = [slice(None), slice(None)]
        for d, n in enumerate(extent):
            want = size[d] if size is not None else self.ints(1, n)
            start, s = self.ints(0, n - want), self.ints(1, 2) if step else 1
            end = None if start + want == n and self.coin() else start + want
            if self.coin(0.3):  # the same slice, counted from the end
                start, end = start - n, None if end in (None, n) else end - n
            index.append(slice(start, end, s))
        return self.add("slice", [i], index=tuple(index))

    def pixel_shuffle(self, i):
        c, *extent = self.shapes[i]
        if self.coin() or c % 4:
            if any(n % 2 for n in extent):
                i = self.crop(i, [n - n % 2 for n in extent]) or i
            return self.add("layer", [i], "PixelUnshuffle", downscale_factor=2)
        return self.add("layer", [i], "PixelShuffle", upscale_factor=2)

    def pointwise(self, i):
        c, nd = self.shapes[i][0], self.nd
        kind = self.choice(["activation", "activation", "function", "batchnorm", "dropout", "prelu"])
        if kind == "activation":
            return self.add("layer", [i], self.choice(ACTIVATIONS))
        if kind == "function":
            return self.add("fn", [i], name=self.choice(sorted(FUNCTIONS)))
        if kind == "batchnorm":
            return self.add("layer", [i], f"BatchNorm{nd}d", num_features=c)
        if kind == "dropout":
            return self.add("layer", [i], self.choice(["Dropout", f"Dropout{nd}d"]), p=0.5)  # eval mode
        return self.add("layer", [i], "PReLU", num_parameters=self.choice([1, c]))

    def unary(self, i):
        ops = [self.conv] * 3 + [self.conv_transpose, self.pool, self.upsample, self.pad, self.crop]
        ops += [self.pointwise] * 2 + ([self.pixel_shuffle] if self.nd == 2 else [])
        op = self.choice(ops)
        return op(i, step=self.coin(0.3)) if op == self.crop else op(i)

    # -- several inputs

    def residual(self):
        i = self.pick()
        c = self.shapes[i][0]
        j = i
        for _ in range(self.ints(1, 2)):
            j = self.conv(j, cout=c, keep_shape=True) or j
            if self.coin():
                j = self.pointwise(j) or j
        if j != i and self.shapes[j] == self.shapes[i]:
            return self.add("add", [i, j])
        return None

    def unet(self):
        """Down, a few ops, up, fitted back to the skip's exact shape, then merged with the skip."""
        i = self.pick()
        c, *extent = self.shapes[i]
        s = self.choice([2, 2, 3])
        how = self.choice(["conv", "pool", "pixel"] if self.nd == 2 and s == 2 else ["conv", "pool"])
        if how == "conv":
            k = self.ints(s, s + 2)
            j = self.add(
                "layer",
                [i],
                f"Conv{self.nd}d",
                in_channels=c,
                out_channels=self.ints(2, MAX_CHANNELS),
                kernel_size=k,
                stride=s,
                padding=self.ints(0, k // 2),
                padding_mode=self.choice(["zeros", "reflect"]),
            )
        elif how == "pool":
            j = self.add(
                "layer",
                [i],
                self.choice(["MaxPool", "AvgPool"]) + f"{self.nd}d",
                kernel_size=s,
                ceil_mode=self.coin(),
            )
        else:
            j = self.crop(i, [n - n % 2 for n in extent]) if any(n % 2 for n in extent) else i
            j = None if j is None else self.add("layer", [j], "PixelUnshuffle", downscale_factor=2)
        if j is None:
            return None
        for _ in range(self.ints(0, 2)):
            j = self.conv(j, keep_shape=True) or j
            j = self.pointwise(j) or j
        up = self.choice(
            ["transpose", "upsample", "resize", "pixel"]
            if self.nd == 2
            else ["transpose", "upsample", "resize"]
        )
        if up == "transpose":
            j = self._transpose_to(j, s, extent) or self.upsample(j, factor=s)
        elif up == "upsample":
            j = self.upsample(j, factor=s)
        elif up == "resize":
            j = self.resize(j, extent)
        else:
            j = (
                self.add("layer", [j], "PixelShuffle", upscale_factor=2)
                if self.shapes[j][0] % 4 == 0
                else None
            )
        if j is None or (j := self.fit(j, extent)) is None:
            return None
        if self.coin() or self.shapes[j][0] != c:
            return self.add("cat", [i, j] if self.coin() else [j, i])
        return self.add("add", [i, j])

    def _transpose_to(self, j, s, extent):
        """A transposed convolution whose output has exactly ``extent``, via output_padding, if one exists."""
        (c, *have), k, dilation = self.shapes[j], self.ints(s, s + 2), self.choice([1, 1, 2])
        padding, output_padding = [], []
        for n_in, n_out in zip(have, extent, strict=True):
            for p in range(dilation * (k - 1) + 1):
                op = n_out - ((n_in - 1) * s - 2 * p + dilation * (k - 1) + 1)
                if 0 <= op < max(s, dilation):
                    padding.append(p)
                    output_padding.append(op)
                    break
            else:
                return None
        return self.add(
            "layer",
            [j],
            f"ConvTranspose{self.nd}d",
            in_channels=c,
            out_channels=self.ints(1, 6),
            kernel_size=k,
            stride=s,
            padding=tuple(padding),
            output_padding=tuple(output_padding),
            dilation=dilation,
        )

    def fit(self, j, extent):
        """Crop or pad ``j`` to exactly ``extent``."""
        have = self.shapes[j][1:]
        if any(a > b for a, b in zip(have, extent, strict=True)):
            j = self.crop(j, [min(a, b) for a, b in zip(have, extent, strict=True)])
            if j is None:
                return None
        have = self.shapes[j][1:]
        if have != tuple(extent):
            pads = []
            for a, b in zip(reversed(have), reversed(extent), strict=True):
                lo = self.ints(0, b - a)
                pads += [lo, b - a - lo]
            j = self.pad(j, tuple(pads))
        return j

    def branch(self):
        """Merge two values of the same spatial shape: cat, add or gate."""
        i = self.pick()
        same = [k for k, s in enumerate(self.shapes) if s is not None and s[1:] == self.shapes[i][1:]]
        j = self.choice(same)
        if self.shapes[i][0] == self.shapes[j][0] and self.coin(0.6):
            return self.add(self.choice(["add", "gate"]), [i, j])
        return self.add("cat", [i, j])

    def channel_split(self):
        i = self.pick()
        c = self.shapes[i][0]
        if c < 2:
            return None
        if self.coin():
            parts = self.add("chunk", [i], chunks=self.ints(2, c))
        else:
            cut = self.ints(1, c - 1)
            parts = self.add("split", [i], sizes=[cut, c - cut])
        if parts is None:
            return None
        a = self.add("item", [parts], k=0)
        if self.coin():
            return self.add("slice", [i], index=(slice(None), slice(self.ints(0, c - 1), None)))
        b = self.add("item", [parts], k=-1)
        return self.add("cat", [b, a]) if self.coin() else b


@st.composite
def blueprints(draw, nd: int, dag: bool, max_steps: int):
    lo, hi = INPUT_EXTENT[nd]
    input_shape = (draw(st.integers(1, 2)), draw(st.integers(1, 4))) + tuple(
        draw(st.integers(lo, hi)) for _ in range(nd)
    )
    d = Drawer(draw, nd, input_shape)
    for _ in range(draw(st.integers(min(2, max_steps), max_steps))):
        if dag and d.coin(0.5):
            d.choice([d.residual, d.unet, d.unet, d.branch, d.channel_split])()
        else:
            d.unary(d.pick())
    last = len(d.shapes) - 1
    while d.shapes[last] is None:
        last -= 1
    head = draw(st.sampled_from(["dense", "two dense", "reduce", "dense and reduce"]))
    dense = {"dense": (last,), "two dense": (last, d.pick()), "reduce": ()}.get(head, (last,))
    reduce = None
    if "reduce" in head:
        how = draw(st.sampled_from(["AdaptiveAvgPool", "AdaptiveMaxPool", "mean", "amax", "amin", "sum"]))
        k = d.pick() if dense else last
        reduce = (k, how, d.shapes[k][0])
    spatial = input_shape[2:]
    fewest = [math.ceil(n / TILES_PER_DIM[nd]) for n in spatial]  # the smallest tile, per dimension

    def extent(lo, n):  # often small (many tiles, smaller than the receptive field), at times the image
        return draw(st.one_of(st.integers(lo, lo + 3), st.integers(lo, n + 2)))

    if draw(st.booleans()):
        tile = extent(max(fewest), max(spatial))
    else:
        tile = tuple(extent(f, n) for f, n in zip(fewest, spatial, strict=True))
    seed = draw(st.integers(0, 2**16))
    return Blueprint(nd, input_shape, d.nodes, dense, reduce, tile, seed)


# -- regressions these tests found ----------------------------------------------------------


class _UNet1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv1d(1, 1, 2, stride=2)
        self.up = nn.ConvTranspose1d(1, 1, 2, stride=2, output_padding=1)

    def forward(self, x):
        return torch.cat([x, self.up(self.down(x))], 1)


REGRESSIONS = {
    # A tile needs an empty box of a node (all it reads is its user's padding or output_padding).
    "output_padding_column_only": (_UNet1d, (1, 1, 9), 4),
    "constant_padding_only": (
        lambda: nn.Sequential(nn.Conv1d(1, 1, 1), nn.ConstantPad1d((8, 0), 0.0), nn.MaxPool1d(1, 2)),
        (1, 1, 8),
        4,
    ),
    # A tile whose write box reads only padding of the input has no input gradient.
    "tile_reads_only_input_padding": (lambda: nn.Conv1d(1, 1, 1, stride=3, padding=2), (1, 1, 6), 3),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regression(name):
    factory, shape, tile = REGRESSIONS[name]
    torch.manual_seed(0)
    assert_tiled_matches(factory().double(), torch.randn(shape, dtype=torch.float64), tile)


def check(blueprint: Blueprint):
    assert_tiled_matches(blueprint.build(), torch.randn(blueprint.input_shape, dtype=torch.float64), blueprint.tile)


@examples(100)
@given(blueprints(nd=2, dag=False, max_steps=7))
def test_random_stacks_2d(blueprint):
    check(blueprint)


@examples(100)
@given(blueprints(nd=2, dag=True, max_steps=5))
def test_random_dags_2d(blueprint):
    check(blueprint)


@examples(80)
@given(blueprints(nd=1, dag=True, max_steps=6))
def test_random_architectures_1d(blueprint):
    check(blueprint)


@examples(40)
@given(blueprints(nd=3, dag=True, max_steps=3))
def test_random_architectures_3d(blueprint):
    check(blueprint)
