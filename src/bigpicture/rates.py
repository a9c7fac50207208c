"""How fast each kind of op runs on a device: the efficiency half of the roofline.

    op on a box --> kind ("conv", "pool", "unary", "binary", "norm", "copy") and size
                --> rate: flops/s for convolutions and pooling windows, bytes/s for the rest

The local CPU is *measured* (`measure`, called by `devices.calibrate`): convolutions over a
grid of channel counts, kernels and spatial sizes, forward and backward; memory-bound ops over
tensor sizes from cache-resident to DRAM-sized; and the engine's own per-node, per-tile cost
(the Python interpreter, box arithmetic, border padding, dispatch), which dominates tiles that are
too small: tiled runs of a small network with the node types of real ones, minus what the rates
give its ops (a chain of 1x1 convolutions and ReLUs, used before, gave half the cost real
networks showed).
A rate for a size between measurements is interpolated in log space.

GPUs in the device table are not measured here; their rates follow documented assumptions
(see `GPU_ASSUMPTIONS`): cuDNN/cuBLAS convolutions reach at most 70% of the dense peak of the
dtype, less for few channels or few output positions, and memory-bound ops 80% of the
datasheet bandwidth, less for tensors of under a few MiB. Every op pays a launch floor, and the
host (PyTorch eager dispatch plus the tile interpreter) runs ahead of the GPU asynchronously,
so a tile takes the longer of its GPU time and its host time.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .devices import Device, _seconds_per_call

GPU_ASSUMPTIONS = (
    "GPU rates are assumptions, not measurements: convolutions reach 70% of the dtype's dense peak "
    "at large channel counts (x c/(c+h) for input channels x kernel and for output channels, h = 32 on "
    "tensor cores (fp16, bf16, tf32) and 8 on CUDA cores (fp32, fp64), x "
    "p/(p+16384) for output positions), memory-bound ops 80% of datasheet bandwidth (x n/(n+2 MiB) "
    "for n bytes); 5 us launch floor per op; host dispatch 20 us per op and the tile interpreter "
    "60 us per node per tile, overlapped with GPU work."
)
GPU_CONV_EFFICIENCY = 0.7
GPU_STREAM_EFFICIENCY = 0.8
GPU_HOST_OP_S = 20e-6
GPU_ENGINE_NODE_S = 60e-6
NOMINAL_ENGINE_NODE_S = 60e-6  # an uncalibrated CPU: Python per node per tile (typical, measured here once)

STREAM_KINDS = ("unary", "binary", "norm", "copy")
PARALLEL_ELEMENTS = 32768  # at::internal::GRAIN_SIZE: smaller elementwise ops run on one thread


class Rates:
    """Rates of one device for one dtype."""

    def __init__(self, device: Device, dtype: torch.dtype, calibration: dict[str, Any] | None = None) -> None:
        self.device, self.dtype = device, dtype
        self.peak = device.peak(_compute_dtype(device, dtype))
        self.gpu = device.name != "cpu"
        ops = (calibration or {}).get("ops")
        self.ops = ops if ops and ops.get("dtype") == str(dtype).removeprefix("torch.") else None
        self.launch_s = device.launch_overhead_s
        # CPU: an op big enough to run on every thread first wakes the idle ones (OMP_WAIT_POLICY)
        self.wake_s = 0.0 if self.gpu else (self.ops or {}).get("wake_s", 0.0)
        self._conv: dict = {}  # memo: a network repeats a few convolution shapes many times
        # CPU convolutions hold a workspace besides their output (GPUs: in the framework allowance)
        workspace = (self.ops or {}).get("conv_workspace", DEFAULT_WORKSPACE)
        self.conv_workspace = {} if self.gpu else workspace
        if self.gpu:
            self.node_s, self.train_node_s, self.host_op_s = (
                GPU_ENGINE_NODE_S,
                3 * GPU_ENGINE_NODE_S,
                GPU_HOST_OP_S,
            )
        elif self.ops:
            self.node_s, self.train_node_s = self.ops["engine_node_s"], self.ops["engine_train_node_s"]
            self.host_op_s = 0.0
        else:
            self.node_s, self.train_node_s, self.host_op_s = (
                NOMINAL_ENGINE_NODE_S,
                3 * NOMINAL_ENGINE_NODE_S,
                0.0,
            )

    @property
    def measured(self) -> bool:
        return self.ops is not None

    def conv(self, nd: int, fan_in: int, cout: int, positions: int, stride: int = 1, backward: bool = False,
             transposed: bool = False, *, cin: int | None = None, kernel: int | None = None,
             backend: str | None = None) -> float:  # fmt: skip
        """Flops/s of a convolution: fan_in = input channels per group x kernel volume; positions are
        the output's (the input's for a transposed convolution). With the input channels `cin`, the
        kernel volume and torch's `backend` (`conv_backend`), a CPU rate is interpolated among the
        measurements of that backend and kernel (`_grid_rate`); else from the nearest ones."""
        if self.gpu:
            # tensor-core tiles are wider than the CUDA cores' (fp32 without TF32): they fill later
            half = 32 if self.peak > 1.01 * self.device.peak("fp32") else 8
            shape = fan_in / (fan_in + half) * cout / (cout + half) * positions / (positions + 16384)
            return self.peak * GPU_CONV_EFFICIENCY * shape
        if self.ops is None:
            return 0.5 * self.peak
        key = (nd, fan_in, cout, positions, stride, backward, transposed, cin, kernel, backend)
        if key not in self._conv:
            value = "backward" if backward else "forward"
            points = [
                p for p in self.ops["conv"] if p["nd"] == nd and p.get("transposed", False) == transposed
            ]
            points = points or self.ops["conv"]
            rate = None
            if cin is not None and kernel is not None and all("cin" in p for p in points):
                rate = _grid_rate(points, value, cin, cout, positions, stride, kernel, backend)
            if rate is None:
                rate = _nearest(
                    [(p["fan_in"], p["cout"], p["positions"], 4 ** (p["stride"] - 1)) for p in points],
                    [p[value] for p in points],
                    (fan_in, cout, positions, 4 ** (min(stride, 2) - 1)),
                )
            self._conv[key] = rate
        return self._conv[key]

    def workspace(self, nd: int, operand_bytes: int, im2col_bytes: int) -> int:
        """Bytes a convolution holds while it runs besides its output (GPUs: in the framework allowance)."""
        basis, factor = self.conv_workspace.get(str(nd), ("operand", 0.0))
        return max(int(factor * (im2col_bytes if basis == "im2col" else operand_bytes)), 0)

    def pool(self, window_elements: int, backward: bool = False) -> float:
        """Window elements (output elements x kernel volume) per second of a pooling op."""
        if self.gpu or self.ops is None:
            return math.inf  # memory-bound: the stream time of its bytes decides
        table = self.ops["pool"]["backward" if backward else "forward"]
        return _interpolate([w for w, _ in table], [r for _, r in table], window_elements)

    def stream(self, kind: str, nbytes: int) -> float:
        """Bytes/s of a memory-bound op moving `nbytes` (read + written)."""
        bandwidth = self.device.bandwidth_bytes_per_s
        if self.gpu:
            return bandwidth * GPU_STREAM_EFFICIENCY * nbytes / (nbytes + 2 * 2**20)
        if self.ops is None:
            return bandwidth
        table = self.ops["stream"][kind if kind in STREAM_KINDS else "unary"]
        return _interpolate([s for s, _ in table], [r for _, r in table], nbytes)


def _compute_dtype(device: Device, dtype: torch.dtype) -> torch.dtype | str:
    # torch runs float32 convolutions and matmuls as TF32 on Ampere and newer by default for cuDNN
    if device.name != "cpu" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return dtype


def _interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise linear in log x; constant beyond the ends."""
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if x <= x1:
            w = math.log(x / x0) / math.log(x1 / x0)
            return y0 + w * (y1 - y0)
    return ys[-1]


def _nearest(points: list[tuple[float, ...]], values: list[float], at: tuple[float, ...]) -> float:
    """Inverse-distance weighting of the 3 nearest measurements, in log space."""
    logs = [math.log(max(v, 1)) for v in at]
    dist = sorted(
        (math.dist(logs, [math.log(max(v, 1)) for v in p]), value)
        for p, value in zip(points, values, strict=True)
    )[:3]
    if dist[0][0] < 1e-9:
        return dist[0][1]
    weights = [1 / d**2 for d, _ in dist]
    return sum(w * v for w, (_, v) in zip(weights, dist, strict=True)) / sum(weights)


def _grid_rate(
    points: list[dict], value: str, cin: int, cout: int, positions: int, stride: int, kernel: int,
    backend: str | None,
) -> float | None:  # fmt: skip
    """A convolution's rate from the calibration grid: among the measurements with the same stride
    class (1 or more), the same backend if any were measured with it (torch switches between im2col
    and oneDNN kernels at input sizes where rates jump), and the nearest kernel volume, multilinear
    in log(input channels), log(output channels), log(positions) over the grid's corners around the
    query, geometric in the rate; corners the grid skipped are left out of the weights."""
    points = [p for p in points if (p["stride"] > 1) == (stride > 1)] or points
    if backend is not None:
        points = [p for p in points if p.get("backend") == backend] or points
    near = min({p["kernel"] for p in points}, key=lambda k: (abs(math.log(k / kernel)), -k))
    points = [p for p in points if p["kernel"] == near]
    table = {(p["cin"], p["cout"], p["positions"]): p[value] for p in points}
    corners = []
    for axis, q in enumerate((cin, cout, positions)):
        values = sorted({k[axis] for k in table})
        lo = max((v for v in values if v <= q), default=values[0])
        hi = min((v for v in values if v >= q), default=values[-1])
        w = math.log(q / lo) / math.log(hi / lo) if hi > lo else 0.0
        corners.append(((lo, 1 - w), (hi, w)) if hi > lo else ((lo, 1.0),))
    total = weight = 0.0
    for corner in itertools.product(*corners):
        w = math.prod(w for _, w in corner)
        rate = table.get(tuple(v for v, _ in corner))
        if rate and w > 0:
            total, weight = total + w * math.log(rate), weight + w
    return math.exp(total / weight) if weight > 0 else None


@functools.lru_cache(maxsize=4096)
def conv_backend(
    input_shape: tuple[int, ...], weight_shape: tuple[int, ...], stride: tuple[int, ...],
    dilation: tuple[int, ...], groups: int, transposed: bool, dtype: torch.dtype = torch.float32,
) -> str | None:  # fmt: skip
    """The kernel family torch's CPU dispatch picks for a convolution of these shapes, as the tile
    interpreter calls it (input padded already, padding 0): "Slow2d"/"Slow3d" (im2col + GEMM),
    "Mkldnn" (oneDNN), ... Asked of torch's own heuristic on tensors expanded from one element, so
    nothing of the shape is allocated; None where this torch cannot say."""
    nd = len(input_shape) - 2
    try:
        x = torch.empty(1, dtype=dtype).expand(input_shape)
        w = torch.empty(1, dtype=dtype).expand(weight_shape)
        backend = torch._C._select_conv_backend(
            x, w, None, list(stride), [0] * nd, list(dilation), transposed, [0] * nd, groups, None
        )
    except (AttributeError, RuntimeError, TypeError):
        return None
    return str(backend).rsplit(".", 1)[-1]


# -- measurement of the local CPU --------------------------------------------------------------


def _conv_grid(quick: bool) -> list[tuple[int, int, int, int, int, int, bool]]:
    """(nd, cin, cout, kernel, stride, side, transposed) of the measured convolutions; side is the
    output's (the input's for transposed ones). Channel counts step by 2 where networks live (CPU
    kernels run multiples of the vector width far faster than the counts between), and small ones
    are measured: CPU libraries fall back to slow generic kernels for them, in 3D especially. Sides
    straddle the input sizes where torch switches between im2col and oneDNN kernels."""
    if quick:
        return [(2, 4, 8, 3, 1, 16, False), (2, 4, 8, 1, 2, 16, False), (3, 2, 4, 3, 1, 8, False),
                (2, 4, 4, 2, 2, 8, True)]  # fmt: skip
    channels = {
        2: ((3, 8, 16, 32, 64, 128), (2, 8, 16, 32, 64, 128)),
        3: ((1, 4, 8, 16, 32, 64), (2, 4, 8, 16, 32, 64)),
    }
    # 3D: torch runs small convolutions as im2col + GEMM, whose column matrix of a large tile
    # outgrows the caches (and, over 32 MiB, glibc's heap: fresh pages, faulted in on every call)
    sides = {2: (4, 16, 48, 128, 256), 3: (4, 12, 24, 40, 56)}
    grid = [(nd, cin, cout, k, 1, side, False) for nd in (2, 3) for cin in channels[nd][0]
            for cout in channels[nd][1] for k in (1, 3) for side in sides[nd]]  # fmt: skip
    # downsampling: channels kept or doubled; a 7x7 stem on RGB
    grid += [(2, cin, cout, k, 2, side, False) for cin in (16, 32, 64, 128) for cout in (16, 32, 64, 128)
             if cout >= cin for k in (1, 3) for side in (8, 32, 96)]  # fmt: skip
    grid += [(2, 3, cout, 7, 2, side, False) for cout in (16, 32, 64) for side in (8, 32, 128)]
    grid += [(3, cin, cout, 3, 2, side, False) for cin in (1, 8, 16, 32) for cout in (8, 16, 32, 64)
             if cout >= cin for side in (8, 24)]  # fmt: skip
    # upsampling: channels kept or reduced, down to a segmentation head's few
    grid += [(nd, cin, cout, k, 2, side, True) for nd in (2, 3) for cin in (8, 16, 32, 64, 128)
             for cout in (2, 8, 16, 32, 64) if cout <= cin for k in (2, 3)
             for side in ((8, 48) if nd == 2 else (4, 16))]  # fmt: skip
    # skip the few cases that would take seconds each; neighbours cover them
    return [g for g in grid if 2 * g[1] * g[2] * g[3] ** g[0] * g[5] ** g[0] <= 2e9]


def _conv(dtype: torch.dtype, quick: bool, seconds, min_time: float) -> list[dict[str, Any]]:
    """Convolutions as the tile interpreter calls them: the input already padded, padding=0."""
    out = []
    for nd, cin, cout, k, stride, side, transposed in _conv_grid(quick):
        if transposed:
            conv = (F.conv_transpose2d, F.conv_transpose3d)[nd - 2]
            x = torch.randn((1, cin) + (side,) * nd, dtype=dtype, requires_grad=True)
            w = torch.randn((cin, cout) + (k,) * nd, dtype=dtype, requires_grad=True)
        else:
            conv = (F.conv2d, F.conv3d)[nd - 2]
            x = torch.randn((1, cin) + ((side - 1) * stride + k,) * nd, dtype=dtype, requires_grad=True)
            w = torch.randn((cout, cin) + (k,) * nd, dtype=dtype, requires_grad=True)
        flops = 2 * cin * cout * k**nd * side**nd
        with torch.no_grad():
            fwd = seconds(lambda c=conv, x=x, w=w, s=stride: c(x, w, stride=s), min_time)
        y = conv(x, w, stride=stride)
        g = torch.ones_like(y)
        bwd = seconds(
            lambda y=y, x=x, w=w, g=g: torch.autograd.grad(y, (x, w), g, retain_graph=True), min_time
        )
        strides, ones = (stride,) * nd, (1,) * nd
        backend = conv_backend(tuple(x.shape), tuple(w.shape), strides, ones, 1, transposed, dtype)
        shape = {"nd": nd, "cin": cin, "cout": cout, "kernel": k**nd, "fan_in": cin * k**nd,
                 "positions": side**nd, "stride": stride, "transposed": transposed,
                 "backend": backend}  # fmt: skip
        out.append({**shape, "forward": flops / fwd, "backward": 2 * flops / bwd})
    return out


def _stream(dtype: torch.dtype, quick: bool, seconds, min_time: float) -> dict[str, list[list[float]]]:
    sizes = [2**16, 2**22] if quick else [2**12, 2**16, 2**19, 2**22, 2**25, 2**27]
    item = torch.empty((), dtype=dtype).element_size()
    out: dict[str, list[list[float]]] = {k: [] for k in STREAM_KINDS}
    for nbytes in sizes:
        n = max(nbytes // item // 2, 64)  # nbytes is read + written of a unary op
        x = torch.randn(1, 16, n // 16, dtype=dtype)
        mean, var = torch.zeros(16, dtype=dtype), torch.ones(16, dtype=dtype)
        half = x[:, :8].contiguous()
        cases = {
            "unary": (lambda x=x: torch.relu(x), 2),
            "binary": (lambda x=x: x + x, 3),
            "norm": (lambda x=x, m=mean, v=var: F.batch_norm(x, m, v, v, m, False), 2),
            "copy": (lambda h=half: torch.cat([h, h], 1), 2),
        }
        for kind, (fn, passes) in cases.items():
            moved = passes * x.numel() * item
            out[kind].append([moved, moved / seconds(fn, min_time)])
    return out


def _pool(dtype: torch.dtype, quick: bool, seconds, min_time: float) -> dict[str, list[list[float]]]:
    """Max pooling 3x3 / 2 as the tile interpreter calls it (input padded already, padding=0), by size."""
    out: dict[str, list[list[float]]] = {"forward": [], "backward": []}
    for side in (9, 33) if quick else (9, 65, 257):
        x = torch.randn(1, 16, side, side, dtype=dtype, requires_grad=True)
        y = F.max_pool2d(x, 3, 2)
        window = y.numel() * 9
        with torch.no_grad():
            fwd = seconds(lambda x=x: F.max_pool2d(x, 3, 2), min_time)
        g = torch.ones_like(y)
        bwd = seconds(lambda x=x, y=y, g=g: torch.autograd.grad(y, x, g, retain_graph=True), min_time)
        out["forward"].append([window, window / fwd])
        out["backward"].append([window, window / bwd])
    return out


def _reference(nd: int) -> torch.nn.Module:
    """A small network with the nodes real ones have (3x3 convolutions padded at the image border,
    strided and transposed ones, normalisation, activations, pooling, a residual addition and a
    concatenation) and few channels, so that the tile interpreter's own cost dominates its run."""
    from torch import nn

    conv, norm = (nn.Conv2d, nn.Conv3d)[nd - 2], (nn.BatchNorm2d, nn.BatchNorm3d)[nd - 2]
    pool, up = (nn.MaxPool2d, nn.MaxPool3d)[nd - 2], (nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 2]

    class Reference(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(conv(1, 2, 3, padding=1), norm(2), nn.ReLU())
            self.block = nn.Sequential(
                conv(2, 2, 3, padding=1), norm(2), nn.PReLU(), conv(2, 2, 3, padding=1)
            )
            self.down = nn.Sequential(conv(2, 2, 3, 2, 1), norm(2), nn.ReLU())
            self.pool = pool(3, 2, 1)
            self.up = up(2, 2, 3, 2, 1, output_padding=1)
            self.head = conv(6, 2, 1)

        def forward(self, x):
            y = self.stem(x)
            y = torch.relu(y + self.block(y))
            z = self.up(self.down(y) + self.pool(y))
            return self.head(torch.cat([y, z, y * z], 1))

    torch.manual_seed(0)
    return Reference()


def _pointwise() -> torch.nn.Module:
    """Memory-bound ops only (normalisation, activations, additions, a concatenation) on 8 channels:
    the reference for what an op on every thread costs in a tiled run over its rate back to back."""
    from torch import nn

    class Pointwise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.act = nn.BatchNorm2d(8), nn.PReLU()

        def forward(self, x):
            y = torch.relu(self.norm(x))
            z = self.act(y + x)
            return torch.cat([y, z * y], 1)

    torch.manual_seed(0)
    return Pointwise()


def _engine(
    quick: bool, clock: Callable[[], float], ops: dict, dtype: torch.dtype
) -> tuple[float, float, float]:
    """Seconds per node per tile of the tile interpreter itself (the Python code around each op:
    boxes, padding at the image border, slicing, dispatch), without and with autograd: tiled runs
    of a small network (`_reference`) minus what the rates just measured (`ops`) give its ops. The
    training step runs as the engine runs it: a forward, the recompute of every tile but the last,
    a backward. The 2D and 3D networks' figures are averaged.

    Third, the seconds each op big enough to run on every thread adds in a tiled run over its rate
    measured back to back: the idle OpenMP threads it wakes after the interpreter's Python (tens of
    microseconds with OMP_WAIT_POLICY=PASSIVE, about nothing when they spin, the default): the 2D
    network on tiles whose ops run on every thread, minus its ops and its nodes."""
    from .devices import get_device
    from .grid import layout
    from .predict import _predict_pass
    from .tiled import freeze_batchnorm, tiled

    rates = Rates(
        get_device("cpu"), dtype, {"ops": {**ops, "engine_node_s": 0.0, "engine_train_node_s": 0.0}}
    )

    def run(nd: int, side: int, tile: int, training: bool, pointwise: bool = False) -> tuple[float, dict]:
        """Measured seconds and predicted ones with unit costs: {(node_s, train_node_s, wake_s): s}."""
        shape = (1, 8 if pointwise else 1) + (side,) * nd
        model = (_pointwise() if pointwise else _reference(nd)).to(dtype)
        model = freeze_batchnorm(model.train()) if training else model.eval()
        net = tiled(model, tile=tile)
        measured = _best_step(net, model, torch.randn(shape, dtype=dtype), training, clock, 3 if quick else 7)
        split = net.plan.split
        lay = layout(split, shape, tile)
        times = {}
        for costs in ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 2.0, 0.0), (0.0, 0.0, 1.0)):
            rates.node_s, rates.train_node_s, rates.wake_s = costs
            times[costs] = _predict_pass(
                split, shape, dtype, lay, rates.device, rates, training, False, True
            ).time
        rates.node_s = rates.train_node_s = rates.wake_s = 0.0
        return measured, times

    zero, node, grad, wake = (0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 2.0, 0.0), (0.0, 0.0, 1.0)
    forward, train = [], []
    for nd, side, tile in ((2, 32, 16),) if quick else ((2, 64, 16), (3, 16, 8)):
        left, nodes = {}, {}
        for training in (False, True):
            measured, times = run(nd, side, tile, training)
            left[training] = measured - times[zero]
            # nodes run without autograd; twice the nodes run with autograd (their forward and backward)
            nodes[training] = (times[node] - times[zero], times[grad] - times[zero])
        node_s = max(left[False], 0.0) / nodes[False][0]
        forward.append(node_s)
        no_grad, with_grad = nodes[True]
        train.append(2 * max(left[True] - node_s * no_grad, 0.0) / with_grad if with_grad else node_s)
    node_s = sum(forward) / len(forward)
    wake_s = 0.0
    if torch.get_num_threads() > 1 and not quick:
        # 8 channels x 96^2 > PARALLEL_ELEMENTS: every op runs on every thread
        measured, times = run(2, 384, 96, False, pointwise=True)
        parallel_ops = times[wake] - times[zero]
        left = measured - times[zero] - node_s * (times[node] - times[zero])
        wake_s = max(left, 0.0) / max(parallel_ops, 1)
    return node_s, sum(train) / len(train), wake_s


def _best_step(
    net, model, x: torch.Tensor, training: bool, clock: Callable[[], float], repeats: int
) -> float:
    """Best time of a tiled inference, or training step, after a first call that plans."""

    def step() -> None:
        if training:
            model.zero_grad(set_to_none=True)
            net(x).sum().backward()
        else:
            with torch.no_grad():
                net(x)

    step()
    times = []
    for _ in range(repeats):
        start = clock()
        step()
        times.append(clock() - start)
    return min(times)


_WORKSPACE_PROBE = """
import re, sys, torch, torch.nn.functional as F
from pathlib import Path
torch.set_num_threads(1)
def rss(key):
    return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
nd, cin, cout, side = ND, CIN, COUT, SIDE
conv = (F.conv2d, F.conv3d)[nd - 2]
x, w = torch.randn((1, cin) + (side,) * nd), torch.randn((cout, cin) + (3,) * nd)
with torch.no_grad():
    del_ = conv(x, w)
    del del_
    Path("/proc/self/clear_refs").write_text("5")
    base = rss("VmRSS")
    y = conv(x, w)
    extra = rss("VmHWM") - base - y.numel() * 4
    print(extra / max(x.numel(), y.numel()) / 4, extra / (cin * 3**nd * y[0, 0].numel() * 4))
"""
# what this machine's torch (2.13, CPU) showed: oneDNN for 2D, im2col ("slow_conv3d") for 3D
DEFAULT_WORKSPACE = {"2": ["operand", 1.0], "3": ["im2col", 1.0]}


def _conv_workspace(quick: bool) -> dict[str, list]:
    """Bytes a CPU convolution holds besides its output, per dimensionality: a multiple of its
    larger operand (oneDNN converting layouts) or of its im2col matrix (generic kernels). Measured as
    peak RSS in fresh processes whose glibc returns freed memory at once; the basis that explains
    the measurement best is kept."""
    import subprocess
    import sys

    out = dict(DEFAULT_WORKSPACE)
    for nd, cin, cout, side in ((2, 4, 8, 64), (3, 2, 4, 12)) if quick else ((2, 16, 16, 330), (3, 8, 8, 29)):
        code = _WORKSPACE_PROBE
        for key, value in (("ND", nd), ("CIN", cin), ("COUT", cout), ("SIDE", side)):
            code = code.replace(key, str(value))
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
        try:
            run = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
            )
            operand, im2col = map(float, run.stdout.split())
        except (OSError, ValueError, subprocess.TimeoutExpired):
            continue
        out[str(nd)] = ["im2col", im2col] if abs(im2col - 1) < abs(operand - 1) else ["operand", operand]
    return out


def measure(
    quick: bool = False,
    dtype: torch.dtype = torch.float32,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Rates of this CPU for `dtype` (about a minute; `quick` takes a second, for tests)."""
    min_time = 0.005 if quick else 0.01
    seconds = functools.partial(_seconds_per_call, clock=clock)
    ops = {
        "dtype": str(dtype).removeprefix("torch."),
        "conv": _conv(dtype, quick, seconds, min_time),
        "stream": _stream(dtype, quick, seconds, min_time),
        "pool": _pool(dtype, quick, seconds, min_time),
        "conv_workspace": _conv_workspace(quick),
    }
    ops["engine_node_s"], ops["engine_train_node_s"], ops["wake_s"] = _engine(quick, clock, ops, dtype)
    return ops
