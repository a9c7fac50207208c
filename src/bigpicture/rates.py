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


class Rates:
    """Rates of one device for one dtype."""

    def __init__(self, device: Device, dtype: torch.dtype, calibration: dict[str, Any] | None = None) -> None:
        self.device, self.dtype = device, dtype
        self.peak = device.peak(_compute_dtype(device, dtype))
        self.gpu = device.name != "cpu"
        ops = (calibration or {}).get("ops")
        self.ops = ops if ops and ops.get("dtype") == str(dtype).removeprefix("torch.") else None
        self.launch_s = device.launch_overhead_s
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
             transposed: bool = False) -> float:  # fmt: skip
        """Flops/s of a convolution: fan_in = input channels per group x kernel volume; positions are
        the output's (the input's for a transposed convolution)."""
        if self.gpu:
            # tensor-core tiles are wider than the CUDA cores' (fp32 without TF32): they fill later
            half = 32 if self.peak > 1.01 * self.device.peak("fp32") else 8
            shape = fan_in / (fan_in + half) * cout / (cout + half) * positions / (positions + 16384)
            return self.peak * GPU_CONV_EFFICIENCY * shape
        if self.ops is None:
            return 0.5 * self.peak
        key = (nd, fan_in, cout, positions, stride, backward, transposed)
        if key not in self._conv:
            points = [
                p for p in self.ops["conv"] if p["nd"] == nd and p.get("transposed", False) == transposed
            ]
            points = points or self.ops["conv"]
            rate = _nearest(
                [(p["fan_in"], p["cout"], p["positions"], 4 ** (p["stride"] - 1)) for p in points],
                [p["backward" if backward else "forward"] for p in points],
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


# -- measurement of the local CPU --------------------------------------------------------------


def _conv_grid(quick: bool) -> list[tuple[int, int, int, int, int, int, bool]]:
    """(nd, cin, cout, kernel, stride, side, transposed) of the measured convolutions; side is the
    output's (the input's for transposed ones). Small channel counts matter: CPU libraries fall back
    to slow generic kernels for them, in 3D especially."""
    if quick:
        return [(2, 4, 8, 3, 1, 16, False), (2, 4, 8, 1, 2, 16, False), (3, 2, 4, 3, 1, 8, False),
                (2, 4, 4, 2, 2, 8, True)]  # fmt: skip
    # few output channels (a segmentation head) run far below the rate of 8: measured, not extrapolated
    channels = {2: ((3, 8, 32, 128), (2, 8, 32, 128)), 3: ((1, 2, 4, 16, 64), (2, 4, 16, 64))}
    # 3D: torch runs few-channel convolutions as im2col + GEMM, whose column matrix of a large tile
    # outgrows the caches (and, over 32 MiB, glibc's heap: fresh pages, faulted in on every call)
    sides = {2: (4, 16, 64, 200), 3: (4, 12, 32, 48)}
    grid = [(nd, cin, cout, k, 1, side, False) for nd in (2, 3) for cin in channels[nd][0]
            for cout in channels[nd][1] for k in (1, 3) for side in sides[nd]]  # fmt: skip
    grid += [(2, cin, cout, k, 2, side, False) for cin in (3, 16, 64) for cout in (16, 64) for k in (1, 3, 7)
             for side in (8, 64)]  # fmt: skip
    grid += [(3, cin, cout, 3, 2, side, False) for cin in (1, 8) for cout in (8, 32) for side in (8, 24)]
    grid += [(nd, cin, cout, k, 2, side, True) for nd in (2, 3) for cin in (8, 32, 128) for cout in (2, 8, 32)
             for k in (2, 3) for side in ((8, 48) if nd == 2 else (4, 16))]  # fmt: skip
    # skip the few cases that would take seconds each; neighbours cover them
    return [g for g in grid if 2 * g[1] * g[2] * g[3] ** g[0] * g[5] ** g[0] <= 4e9]


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
        shape = {"nd": nd, "fan_in": cin * k**nd, "cout": cout, "positions": side**nd, "stride": stride}
        out.append({**shape, "transposed": transposed, "forward": flops / fwd, "backward": 2 * flops / bwd})
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


def _engine(quick: bool, clock: Callable[[], float], ops: dict, dtype: torch.dtype) -> tuple[float, float]:
    """Seconds per node per tile of the tile interpreter itself (the Python code around each op:
    boxes, padding at the image border, slicing, dispatch), without and with autograd: tiled runs
    of a small network (`_reference`) minus what the rates just measured (`ops`) give its ops. The
    training step runs as the engine runs it: a forward, the recompute of every tile but the last,
    a backward. The 2D and 3D networks' figures are averaged."""
    from .devices import get_device
    from .grid import layout
    from .predict import _predict_pass
    from .tiled import freeze_batchnorm, tiled

    rates = Rates(
        get_device("cpu"), dtype, {"ops": {**ops, "engine_node_s": 0.0, "engine_train_node_s": 0.0}}
    )
    forward, train = [], []
    for nd, side, tile in ((2, 32, 16),) if quick else ((2, 64, 16), (3, 16, 8)):
        shape = (1, 1) + (side,) * nd
        x = torch.randn(shape, dtype=dtype)
        left, nodes = {}, {}
        for training in (False, True):
            model = _reference(nd).to(dtype)
            model = freeze_batchnorm(model.train()) if training else model.eval()
            net = tiled(model, tile=tile)
            measured = _best_step(net, model, x, training, clock, 3 if quick else 7)
            split = net.plan.split
            lay = layout(split, shape, tile)
            times = {}
            for node_s, train_s in ((0.0, 0.0), (1.0, 0.0), (0.0, 2.0)):
                rates.node_s, rates.train_node_s = node_s, train_s
                p = _predict_pass(split, shape, dtype, lay, rates.device, rates, training, False, True)
                times[node_s, train_s] = p.time
            left[training] = measured - times[0.0, 0.0]
            # nodes run without autograd; twice the nodes run with autograd (their forward and backward)
            nodes[training] = (times[1.0, 0.0] - times[0.0, 0.0], times[0.0, 2.0] - times[0.0, 0.0])
        node_s = max(left[False], 0.0) / nodes[False][0]
        forward.append(node_s)
        no_grad, grad = nodes[True]
        train.append(2 * max(left[True] - node_s * no_grad, 0.0) / grad if grad else node_s)
    return sum(forward) / len(forward), sum(train) / len(train)


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
    min_time = 0.005 if quick else 0.05
    seconds = functools.partial(_seconds_per_call, clock=clock)
    ops = {
        "dtype": str(dtype).removeprefix("torch."),
        "conv": _conv(dtype, quick, seconds, min_time),
        "stream": _stream(dtype, quick, seconds, min_time),
        "pool": _pool(dtype, quick, seconds, min_time),
        "conv_workspace": _conv_workspace(quick),
    }
    ops["engine_node_s"], ops["engine_train_node_s"] = _engine(quick, clock, ops, dtype)
    return ops
