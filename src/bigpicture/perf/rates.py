"""How fast each kind of op runs on a device: the efficiency half of the roofline.

    op on a box --> kind ("conv", "pool", "unary", "binary", "norm", "copy") and size
                --> rate: flops/s for convolutions and pooling windows, bytes/s for the rest

The local CPU is *measured* (`calibrate.measure`, called by `devices.calibrate`): convolutions
over a grid of channel counts, kernels, strides and spatial sizes, each with the backend torch
picks for it; memory-bound ops over tensor sizes from cache-resident to DRAM-sized; and the
engine's own per-node, per-tile cost and per-op wake-up of idle threads. A convolution's rate
comes from the measurements of its backend, kernel and stride class (`rate_tables.py`, with
`conv_rates.conv_backend` asking torch which backend a tile's shape gets); other rates are interpolated by
size in log space.

GPUs in the device table are not measured here; their rates follow documented assumptions
(see `GPU_ASSUMPTIONS` and `gpu_conv_rate`, each with its source): cuDNN/cuBLAS convolutions
reach at most 70% of the dense peak of the dtype, less for few input channels and where the
implicit GEMM's thread-block tiles fill the GPU's SMs unevenly; 3x3 convolutions on CUDA cores
run as Winograd transforms with fewer multiplies; tensor-core convolutions on NCHW tensors pay
cuDNN's transposes to NHWC; memory-bound ops reach 80% of the datasheet bandwidth, less for
tensors of under a few MiB. Every op pays a launch floor, and the host (PyTorch eager dispatch
plus the tile interpreter) runs ahead of the GPU asynchronously, so a tile takes the longer of
its GPU time and its host time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bigpicture.perf.devices import Device
from bigpicture.perf.gpu_rates import (  # noqa: F401 (re-exported: the GPU half of the rates)
    GPU_CONV_EFFICIENCY,
    GPU_CTA_TILE,
    WINOGRAD_3X3,
    gpu_conv_rate,
    quantization,
)
from bigpicture.perf.rate_tables import _grid_table, _logs, _near_points, _nearest_rates, _table_rates

GPU_ASSUMPTIONS = (
    "GPU rates are assumptions, not measurements: convolutions reach 70% of the dtype's dense peak "
    "at large channel counts (x c/(c+h) for input channels x kernel, h = 32 on tensor cores (fp16, "
    "bf16, tf32) and 8 on CUDA cores (fp32, fp64)), x the tile and wave quantization of their "
    "implicit GEMM (128 x 128 output positions x channels per thread block, 32 or 64 channels wide "
    "for fewer, one block per SM at a time; NVIDIA Matrix Multiplication Background User's Guide); "
    "3x3 stride-1 float32 "
    "convolutions on CUDA cores run as Winograd F(2x2,3x3), 2.25x fewer multiplies (Lavin & Gray "
    "2016; cuDNN's WINOGRAD algorithms, picked by cudnn.benchmark); tensor-core convolutions on "
    "NCHW tensors read and write each activation operand once more (cuDNN's NCHW-to-NHWC "
    "transforms; none with channels_last); memory-bound ops 80% of datasheet bandwidth (x n/(n+2 MiB) "
    "for n bytes); 5 us launch floor per op; host dispatch 20 us per op and the tile interpreter "
    "60 us per node per tile, overlapped with GPU work."
)
GPU_STREAM_EFFICIENCY = 0.8
GPU_HOST_OP_S = 20e-6
GPU_ENGINE_NODE_S = 60e-6
NOMINAL_ENGINE_NODE_S = 60e-6  # an uncalibrated CPU: Python per node per tile (typical, measured here once)

STREAM_KINDS = ("unary", "binary", "norm", "copy", "prelu")
# a convolution's calibrated rates (``Rates.conv``'s `backward` -> the calibration's field)
_VALUES = {False: "forward", True: "backward", "weight": "backward_weight"}
PARALLEL_ELEMENTS = 32768  # at::internal::GRAIN_SIZE: smaller elementwise ops run on one thread


class Rates:
    """Rates of one device for one dtype."""

    def __init__(
        self,
        device: Device,
        dtype: torch.dtype,
        calibration: dict[str, Any] | None = None,
        channels_last: bool = False,
    ) -> None:
        # channels_last: GPU tensors in NHWC (``model.to(memory_format=torch.channels_last)``); the
        # tile interpreter's tiles are NCHW, PyTorch's default, so predictions assume NCHW
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.peak = device.peak(_compute_dtype(device, dtype))
        self.gpu = device.name != "cpu"
        ops = (calibration or {}).get("ops")
        self.ops = ops if ops and ops.get("dtype") == str(dtype).removeprefix("torch.") else None
        self.launch_s = device.launch_overhead_s
        # CPU: an op big enough to run on every thread first wakes the idle ones (OMP_WAIT_POLICY)
        self.wake_s = 0.0 if self.gpu else (self.ops or {}).get("wake_s", 0.0)
        self._conv: dict = {}  # memo: a network repeats a few convolution shapes many times
        self._rows: dict = {}  # memo of ``convs``: per context, by (positions, backend)
        self._arrays: dict = {}  # memo of ``conv_rows``: per context, sorted keys and rates
        self._families: dict = {}  # a CPU convolution backend's code in ``conv_rows``' keys
        self._tables: dict = {}  # memo: the calibration's points and grids per kind of convolution
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

    def conv(self, nd: int, fan_in: int, cout: int, positions: int, stride: int = 1,
             backward: bool | str = False, transposed: bool = False, *, cin: int | None = None,
             kernel: int | None = None, backend: str | None = None) -> float:  # fmt: skip
        """Flops/s of a convolution: fan_in = input channels per group x kernel volume; positions are
        the output's (the input's for a transposed convolution). With the input channels `cin`, the
        kernel volume and torch's `backend` (`conv_rates.conv_backend`), a CPU rate is interpolated among the
        measurements of that backend and kernel (`rate_tables._grid_rate`); else from the nearest ones.
        `backward`: False the forward, True the backward (both gradients: flops/s of twice the forward's
        flops), "weight" the backward of a convolution whose input needs no gradient (a network's first
        layer on the image: the weights' gradient alone, flops/s of the forward's flops; CPU kernels
        run it at rates of their own, several times the full backward's for an RGB stem)."""
        if self.gpu:  # a formula of these numbers only (the backward runs at the forward's rate)
            key = (nd, fan_in, cout, positions, stride, transposed, cin, kernel)
            if key not in self._conv:
                self._conv[key] = gpu_conv_rate(self, *key)
            return self._conv[key]
        if self.ops is None:
            return 0.5 * self.peak
        key = (nd, fan_in, cout, positions, stride, backward, transposed, cin, kernel, backend)
        if key not in self._conv:
            self._conv[key] = self.convs(*key[:3], [positions], *key[4:9], [backend])[0]
        return self._conv[key]

    def convs(self, nd: int, fan_in: int, cout: int, positions: list[int], stride: int, backward: bool | str,
              transposed: bool, cin: int | None, kernel: int | None, backends: list) -> list:  # fmt: skip
        """``conv`` at each of ``positions`` with its entry of ``backends``: a node's rows at once, those
        the calibration grid does not cover from their nearest measurements together."""
        if not self.gpu and self.ops is None:  # an uncalibrated CPU: one nominal rate (``conv``'s)
            return [0.5 * self.peak] * len(positions)
        if self.gpu:
            case = {"cin": cin, "kernel": kernel}
            return [self.conv(nd, fan_in, cout, p, stride, backward, transposed, **case, backend=b)
                    for p, b in zip(positions, backends, strict=True)]  # fmt: skip
        # memo per context (what a node's rows share), by (positions, backend): no 10-tuple per row
        context = (nd, fan_in, cout, stride, backward, transposed, cin, kernel)
        memo = self._rows.get(context)
        if memo is None:
            memo = self._rows[context] = {}
        asked = list(zip(positions, backends, strict=True))
        new = [q for q in dict.fromkeys(asked) if q not in memo]
        found = self._cpu_convs(nd, fan_in, cout, stride, backward, transposed, cin, kernel, new)
        memo.update(zip(new, found, strict=True))
        return [memo[q] for q in asked]

    def conv_rows(self, nd: int, fan_in: int, cout: int, stride: int, transposed: bool, cin: int | None,
                  kernel: int | None, positions: np.ndarray, backends: list, which: np.ndarray,
                  back: bool | str = True):  # fmt: skip
        """(forward, backward) ``convs`` of a measured CPU as arrays (the backward ``back``: True, or
        "weight" for the weights' gradient alone, ``conv``), at distinct rows: ``positions``
        (int64) with the backend ``backends[which[row]]``. Kept per convolution in sorted arrays of
        keys (positions x 256 + the backend's code), so known rows are found by numpy, not per row;
        the new ones are ``convs``' (``_cpu_convs``), the same floats. None where the positions or
        backends do not fit the keys."""
        if not (len(positions) and 0 <= positions.min() and positions.max() < 1 << 54):
            return None
        codes = {b: self._families.setdefault(b, len(self._families)) for b in dict.fromkeys(backends)}
        codes = list(map(codes.__getitem__, backends))
        if len(self._families) > 256:
            return None
        key = (positions << 8) + np.array(codes, dtype=np.int64)[which]
        context = (nd, fan_in, cout, stride, transposed, cin, kernel, back)
        keys, fwd, bwd = self._arrays.get(context) or (np.empty(0, dtype=np.int64), np.empty(0), np.empty(0))
        at = np.searchsorted(keys, key)
        if not (at < len(keys)).all() or not (keys[np.minimum(at, len(keys) - 1)] == key).all():
            known = at < len(keys)
            known[known] = keys[at[known]] == key[known]
            miss = np.unique(key[~known])
            names = list(self._families)
            asked = list(zip((miss >> 8).tolist(), [names[c] for c in (miss & 255).tolist()], strict=True))
            case = (cin, kernel, asked)
            forward = self._cpu_convs(nd, fan_in, cout, stride, False, transposed, *case)
            backward = self._cpu_convs(nd, fan_in, cout, stride, back, transposed, *case)
            where = np.searchsorted(keys, miss)  # both sorted, none in common: merged in order
            merged = ((keys, miss), (fwd, forward), (bwd, backward))
            keys, fwd, bwd = (np.insert(known, where, new) for known, new in merged)
            self._arrays[context] = keys, fwd, bwd
            at = np.searchsorted(keys, key)
        return fwd[at], bwd[at]

    def _cpu_convs(self, nd: int, fan_in: int, cout: int, stride: int, backward: bool | str, transposed: bool,
                   cin: int | None, kernel: int | None, asked: list[tuple]) -> list[float]:  # fmt: skip
        """A measured CPU's rates at each (positions, backend) of ``asked`` (distinct): those the
        calibration grid covers from it, the rest from their nearest measurements, together."""
        value, found = _VALUES[backward], {}
        points, gridded = self._points(nd, transposed)
        if not points:  # a calibration without convolutions
            return [0.5 * self.peak] * len(asked)
        if cin is not None and kernel is not None and gridded:
            for backend in dict.fromkeys(b for _, b in asked):  # many positions of one table at once
                table_key = (nd, transposed, value, stride > 1, backend, kernel)
                if table_key not in self._tables:
                    self._tables[table_key] = _grid_table(points, value, stride, kernel, backend)
                at = [q for q in asked if q[1] == backend]
                rates = _table_rates(*self._tables[table_key], cin, cout, [p for p, _ in at])
                found.update((q, r) for q, r in zip(at, rates, strict=True) if r is not None)
        rest = [q for q in asked if q not in found]  # those the grid does not cover: from the nearest points
        if rest:
            head = (fan_in, cout, 4 ** (min(stride, 2) - 1))
            rates = self._nearest(nd, transposed, head, [p for p, _ in rest])
            index = list(_VALUES.values()).index(value)
            found.update(zip(rest, (r[index] for r in rates), strict=True))
        return [found[q] for q in asked]

    def _nearest(self, nd: int, transposed: bool, head: tuple, positions: list[int]) -> list[tuple]:
        """(forward, backward, weights' gradient) rates of a convolution (``head``: its fan-in, output
        channels and stride class) at each of ``positions`` from the nearest measurements
        (``rate_tables._nearest_rates``), kept per convolution and positions: the forward's and the
        backward's rates are asked apart."""
        near = self._tables.get((nd, transposed, "nearest", head))
        if near is None:
            measured = self._tables.get((nd, transposed, "nearest points"))
            if measured is None:  # the points' logs and rates, once per kind of convolution (not per head)
                points = self._points(nd, transposed)[0]
                near = [(p["fan_in"], p["cout"], p["positions"], 4 ** (p["stride"] - 1)) for p in points]
                values = tuple([p[v] for p in points] for v in _VALUES.values())
                measured = np.array([_logs(p) for p in near]), values
                self._tables[nd, transposed, "nearest points"] = measured
            near = _near_points(measured[0], _logs((*head[:2], 1, head[2])), measured[1]), {}
            self._tables[nd, transposed, "nearest", head] = near
        kept = near[1]
        new = [p for p in dict.fromkeys(positions) if p not in kept]
        if new:
            kept.update(zip(new, _nearest_rates(near[0], [math.log(max(p, 1)) for p in new]), strict=True))
        return [kept[p] for p in positions]

    def _points(self, nd: int, transposed: bool) -> tuple[list[dict], bool]:
        """The calibration's convolutions of ``nd`` dimensions (and kind), and whether they form a grid."""
        if (nd, transposed) not in self._tables:
            conv = self.ops["conv"]
            points = [p for p in conv if p["nd"] == nd and p.get("transposed", False) == transposed] or conv
            # calibrations before the weights' gradient was measured apart: the full backward's rate
            # for it too (its flops the forward's: half the full backward's seconds, as before)
            points = [p if "backward_weight" in p else {**p, "backward_weight": p["backward"]}
                      for p in points]  # fmt: skip
            self._tables[nd, transposed] = points, all("cin" in p for p in points)
        return self._tables[nd, transposed]

    def workspace(self, nd: int, operand_bytes: int, im2col_bytes: int, transposed: bool = False) -> int:
        """Bytes a convolution holds while it runs besides its output (GPUs: in the framework allowance);
        transposed convolutions by their own calibration ("2t", "3t") where it has one."""
        kind = f"{nd}t" if transposed and f"{nd}t" in self.conv_workspace else str(nd)
        basis, factor = self.conv_workspace.get(kind, ("operand", 0.0))
        return max(int(factor * (im2col_bytes if basis == "im2col" else operand_bytes)), 0)

    def workspaces(
        self, nd: int, operand_bytes: np.ndarray, im2col_bytes: np.ndarray, transposed: bool = False
    ) -> np.ndarray:
        """``workspace`` of each entry of arrays of byte counts (int64): the same product, truncated
        (both cast an integer to the nearest double, then multiply and truncate toward zero)."""
        kind = f"{nd}t" if transposed and f"{nd}t" in self.conv_workspace else str(nd)
        basis, factor = self.conv_workspace.get(kind, ("operand", 0.0))
        nbytes = np.asarray(im2col_bytes if basis == "im2col" else operand_bytes, dtype=np.int64)
        if isinstance(factor, int):  # an integer factor multiplies exactly, as Python's ints do
            return np.maximum(factor * nbytes, 0)
        return np.maximum((float(factor) * nbytes.astype(np.float64)).astype(np.int64), 0)

    def pool(self, window_elements: int, backward: bool = False) -> float:
        """Window elements (output elements x kernel volume) per second of a pooling op."""
        if self.gpu or self.ops is None:
            return math.inf  # memory-bound: the stream time of its bytes decides
        table = self.ops["pool"]["backward" if backward else "forward"]
        return _interpolate([w for w, _ in table], [r for _, r in table], window_elements)

    def stream(self, kind: str, nbytes: int, backward: bool = False) -> float:
        """Bytes/s of a memory-bound op moving `nbytes` (read + written); with `backward`, of its
        backward where it was calibrated (ReLU, normalisation, PReLU), else a unary op's rate."""
        bandwidth = self.device.bandwidth_bytes_per_s
        if self.gpu:
            return bandwidth * GPU_STREAM_EFFICIENCY * nbytes / (nbytes + 2 * 2**20)
        if self.ops is None:
            return bandwidth
        forward = self.ops["stream"]
        table = (self.ops.get("stream_backward", {}) if backward else forward).get(kind) or forward["unary"]
        return _interpolate([s for s, _ in table], [r for _, r in table], nbytes)

    def streams(self, kind: str, nbytes: np.ndarray, backward: bool = False) -> np.ndarray:
        """``stream`` of each entry of an array of byte counts (the planner's steps on arrays)."""
        nbytes = np.asarray(nbytes, dtype=np.float64)
        if self.gpu:
            return self.stream(kind, nbytes, backward)  # a formula: numpy computes it as Python does
        if self.ops is None:
            return np.full(nbytes.shape, self.stream(kind, 1, backward))
        key = ("stream", kind, backward)
        if key not in self._tables:  # the table as arrays, once: the planner asks per node and pass
            forward = self.ops["stream"]
            tables = self.ops.get("stream_backward", {}) if backward else forward
            table = tables.get(kind) or forward["unary"]
            self._tables[key] = _segments(np.array([s for s, _ in table]), np.array([r for _, r in table]))
        if nbytes.ndim != 1 or len(nbytes) > 64:
            return _interpolate_segments(self._tables[key], nbytes)
        # a few entries: each size's rate kept (numpy's cost per call is most of a few entries' time)
        known = self._tables.setdefault(("stream at", kind, backward), {})
        sizes = nbytes.tolist()
        new = [x for x in sizes if x not in known]
        if new:
            if len(known) > 1 << 16:
                known.clear()
            found = _interpolate_segments(self._tables[key], np.array(new)).tolist()
            known.update(zip(new, found, strict=True))
        return np.array([known[x] for x in sizes], dtype=np.float64)


def _segments(xs: np.ndarray, ys: np.ndarray) -> tuple:
    """What ``_interpolate`` on arrays computes of the table alone, per index ``np.searchsorted``
    gives (0 to len(xs), clipped to a segment): the segment's start, log of its ratio, rise and start
    value (``_interpolate_segments``)."""
    i = np.clip(np.arange(len(xs) + 1), 1, max(len(xs) - 1, 1))  # as np.searchsorted's index is clipped
    x0, x1, y0, y1 = xs[i - 1], xs[np.minimum(i, len(xs) - 1)], ys[i - 1], ys[np.minimum(i, len(xs) - 1)]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(x1 / x0)
    return xs, ys, x0, ratio, y1 - y0, y0


def _interpolate_segments(table: tuple, x: np.ndarray) -> np.ndarray:
    """``_interpolate`` at every entry of ``x`` (in numpy's logarithms), from the table's ``_segments``:
    few numpy calls (the planner asks on arrays of a few entries, thousands of times)."""
    xs, ys, x0, ratio, rise, y0 = table
    i = np.searchsorted(xs, x, side="left")
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = y0[i] + np.log(x / x0[i]) / ratio[i] * rise[i]
    return np.where(x <= xs[0], ys[0], np.where(x > xs[-1], ys[-1], inside))


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


# what this machine's torch (2.13, CPU) showed: oneDNN for 2D, im2col ("slow_conv3d") for 3D
DEFAULT_WORKSPACE = {"2": ["operand", 1.0], "3": ["im2col", 1.0]}
