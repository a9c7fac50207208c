"""Measurement of the local CPU for the performance model: what ``bigpicture calibrate`` stores.

    convolutions   a grid of channels, kernels, strides and sizes, forward, backward and the weights'
                   gradient alone (a first layer's backward), each with
                   the backend torch picks for it (im2col or oneDNN): ``rate_tables._grid_rate`` reads it
    memory-bound   unary, binary, normalisation and copy ops by size
    pooling        max pooling windows by size
    workspace      what a convolution holds besides its output, in fresh processes
    engine         the tile interpreter's own cost per node per tile (a small reference network),
                   and what each multi-threaded op adds in a tiled run (``wake_s``)

Every figure is the best of several trials (other jobs only add time), each op cycling through
copies of its operands beyond the core's caches, as a network finds them (`COLD_BYTES`).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch
import torch.nn.functional as F

from bigpicture.engine import host_heap
from bigpicture.perf.calibrate_engine import engine_costs
from bigpicture.perf.calibration_grid import _conv_grid
from bigpicture.perf.calibration_rounds import best_of
from bigpicture.perf.conv_rates import conv_backend
from bigpicture.perf.devices import calibration_path, machine
from bigpicture.perf.rates import DEFAULT_WORKSPACE, STREAM_KINDS
from bigpicture.perf.timing import (
    CLOCKS,
    bandwidth,
    conv2d_rates,
    launch_overhead,
    matmul_rates,
    seconds_per_call,
)

# An op in a network reads operands written several ops (or a tile) before, mostly gone from the
# core's private caches, and writes a buffer just allocated; the same op timed back to back on one
# tensor finds it in L2. Measured here (1 thread, CPU time): BatchNorm, ReLU and additions on 0.3-1.2
# MiB tensors ran 1.5-2.5x slower cycling through 32 copies than on one; in tiled runs of the perfmodel
# benchmark's ResNet they took 2-4x the rates measured on one tensor. So every op is timed cycling
# through copies of its operands that together exceed the private caches of any current core.
COLD_BYTES = 64 * 2**20


def _copies(nbytes: int, most: int = 16) -> int:
    """How many copies of operands of `nbytes` to cycle through: together at least `COLD_BYTES`."""
    return max(2, min(most, math.ceil(COLD_BYTES / max(nbytes, 1))))


def _cycling(fn: Callable, operands: list[tuple]) -> Callable[[], object]:
    """A call of `fn` on the next of `operands` (argument tuples) in turn, each time it is called."""
    turn = itertools.cycle(operands)
    return lambda: fn(*next(turn))


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
        xs = [x] + [x.detach().clone().requires_grad_() for _ in range(_copies(x.nbytes, 8) - 1)]
        with torch.no_grad():
            fwd = seconds(
                _cycling(lambda x, c=conv, w=w, s=stride: c(x, w, stride=s), [(x,) for x in xs]), min_time
            )
        graphs = [(conv(x, w, stride=stride), x) for x in xs]
        g = torch.ones_like(graphs[0][0])
        bwd = seconds(
            _cycling(lambda y, x, w=w, g=g: torch.autograd.grad(y, (x, w), g, retain_graph=True), graphs),
            min_time,
        )
        # the weights' gradient alone, as for a network's first layer, whose input (the image) needs
        # none: kernels of their own (an RGB 7x7 stem's ran at 5x the full backward's flops/s here)
        weight = seconds(
            _cycling(lambda y, x, w=w, g=g: torch.autograd.grad(y, (w,), g, retain_graph=True), graphs),
            min_time,
        )
        del graphs
        strides, ones = (stride,) * nd, (1,) * nd
        backend = conv_backend(tuple(x.shape), tuple(w.shape), strides, ones, 1, transposed, dtype)
        shape = {"nd": nd, "cin": cin, "cout": cout, "kernel": k**nd, "fan_in": cin * k**nd,
                 "positions": side**nd, "stride": stride, "transposed": transposed,
                 "backend": backend}  # fmt: skip
        rates = {"forward": flops / fwd, "backward": 2 * flops / bwd, "backward_weight": flops / weight}
        out.append({**shape, **rates})
    return out


def _stream_elements(dtype: torch.dtype, quick: bool) -> list[int]:
    """Element counts of the memory-bound ops measured: a unary op moving (read + written) from
    4 KiB, cache-resident, to 128 MiB, DRAM-sized."""
    item = torch.empty((), dtype=dtype).element_size()
    sizes = [2**16, 2**22] if quick else [2**12, 2**16, 2**19, 2**22, 2**25, 2**27]
    return [max(nbytes // item // 2, 64) for nbytes in sizes]


def _stream(dtype: torch.dtype, quick: bool, seconds, min_time: float) -> dict[str, list[list[float]]]:
    item = torch.empty((), dtype=dtype).element_size()
    out: dict[str, list[list[float]]] = {k: [] for k in (*STREAM_KINDS, "norm_strided")}
    for n in _stream_elements(dtype, quick):
        xs = [torch.randn(1, 16, n // 16, dtype=dtype) for _ in range(_copies(n * item))]
        mean, var = torch.zeros(16, dtype=dtype), torch.ones(16, dtype=dtype)
        slope = torch.full((1,), 0.25, dtype=dtype)
        ones, pairs = [(x,) for x in xs], [(x, xs[i - 1]) for i, x in enumerate(xs)]
        halves = [(x[:, :8].contiguous(),) for x in xs]
        # a natively padded convolution's result with the outputs its symmetric padding adds
        # dropped: a strided view, on which PyTorch's BatchNorm takes its generic path
        side = max(math.isqrt(n // 16), 1)
        strided = [(torch.randn(1, 16, side + 1, side + 1, dtype=dtype)[:, :, 1:, 1:],) for _ in xs]
        cases = {
            "unary": (_cycling(torch.relu, ones), 2),
            "binary": (_cycling(torch.add, pairs), 3),
            "norm": (_cycling(lambda x, m=mean, v=var: F.batch_norm(x, m, v, v, m, False), ones), 2),
            "norm_strided": (_cycling(lambda x, m=mean, v=var: F.batch_norm(x, m, v, v, m, False),
                                      strided), 2),
            "copy": (_cycling(lambda h: torch.cat([h, h], 1), halves), 2),
            "prelu": (_cycling(lambda x, a=slope: F.prelu(x, a), ones), 2),
        }
        for kind, (fn, passes) in cases.items():
            moved = passes * (strided[0][0] if kind == "norm_strided" else xs[0]).numel() * item
            out[kind].append([moved, moved / seconds(fn, min_time)])
    return out


def _stream_backward(
    dtype: torch.dtype, quick: bool, seconds, min_time: float
) -> dict[str, list[list[float]]]:
    """Backward of the memory-bound ops autograd saves something for, as three passes over the
    tensor (its gradient and what was saved read, the input's gradient written): ReLU,
    normalisation (as the engine runs it: eval statistics, gradients of its weight and bias) and
    PReLU, whose weight gradient is a reduction over the whole tensor, many times a ReLU's cost."""
    item = torch.empty((), dtype=dtype).element_size()
    out: dict[str, list[list[float]]] = {"unary": [], "norm": [], "prelu": [], "norm_strided": []}
    for n in _stream_elements(dtype, quick):
        xs = [torch.randn(1, 16, n // 16, dtype=dtype, requires_grad=True) for _ in range(_copies(n * item))]
        side = max(math.isqrt(n // 16), 1)  # a natively padded convolution's cropped result (``_stream``)
        views = [torch.randn(1, 16, side + 1, side + 1, dtype=dtype)[:, :, 1:, 1:] for _ in xs]
        views = [v.requires_grad_() for v in views]
        w, b = (
            torch.ones(16, dtype=dtype, requires_grad=True),
            torch.zeros(16, dtype=dtype, requires_grad=True),
        )
        mean, var = torch.zeros(16, dtype=dtype), torch.ones(16, dtype=dtype)
        a = torch.full((1,), 0.25, dtype=dtype, requires_grad=True)
        cases = {
            "unary": lambda x: (torch.relu(x), (x,)),
            "norm": lambda x, m=mean, v=var, w=w, b=b: (F.batch_norm(x, m, v, w, b, False), (x, w, b)),
            "prelu": lambda x, a=a: (F.prelu(x, a), (x, a)),
        }
        cases["norm_strided"] = cases["norm"]
        for kind, graph in cases.items():
            inputs = views if kind == "norm_strided" else xs
            graphs = [graph(x) for x in inputs]
            g = torch.ones_like(graphs[0][0])
            backward = _cycling(lambda y, wrt, g=g: torch.autograd.grad(y, wrt, g, retain_graph=True), graphs)
            grad = seconds(backward, min_time)
            moved = 3 * inputs[0].numel() * item
            out[kind].append([moved, moved / grad])
    return out


def _pool(dtype: torch.dtype, quick: bool, seconds, min_time: float) -> dict[str, list[list[float]]]:
    """Max pooling 3x3 / 2 as the tile interpreter calls it (input padded already, padding=0), by size."""
    out: dict[str, list[list[float]]] = {"forward": [], "backward": []}
    for side in (9, 33) if quick else (9, 65, 257):
        xs = [torch.randn(1, 16, side, side, dtype=dtype, requires_grad=True)]
        xs += [xs[0].detach().clone().requires_grad_() for _ in range(_copies(xs[0].nbytes) - 1)]
        graphs = [(F.max_pool2d(x, 3, 2), x) for x in xs]
        window = graphs[0][0].numel() * 9
        with torch.no_grad():
            fwd = seconds(_cycling(lambda x: F.max_pool2d(x, 3, 2), [(x,) for x in xs]), min_time)
        g = torch.ones_like(graphs[0][0])
        bwd = seconds(
            _cycling(lambda y, x, g=g: torch.autograd.grad(y, x, g, retain_graph=True), graphs), min_time
        )
        out["forward"].append([window, window / fwd])
        out["backward"].append([window, window / bwd])
    return out


_WORKSPACE_PROBE = """
import re, sys, torch, torch.nn.functional as F
from pathlib import Path
torch.set_num_threads(1)
def rss(key):
    return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
nd, cin, cout, side, stride, transposed = ND, CIN, COUT, SIDE, STRIDE, TRANSPOSED
x = torch.randn((1, cin) + (side,) * nd)
if transposed:
    w = torch.randn((cin, cout) + (3,) * nd)
    conv = lambda x, w: (F.conv_transpose2d, F.conv_transpose3d)[nd - 2](x, w, stride=stride, padding=1)
else:
    w = torch.randn((cout, cin) + (3,) * nd)
    conv = lambda x, w: (F.conv2d, F.conv3d)[nd - 2](x, w, stride=stride)
with torch.no_grad():
    del_ = conv(x, w)
    del del_
    Path("/proc/self/clear_refs").write_text("5")
    base = rss("VmRSS")
    y = conv(x, w)
    extra = rss("VmHWM") - base - y.numel() * 4
    # the column matrix: input channels x kernel per output position (a transposed convolution
    # scatters output channels x kernel per input position)
    columns = cout * x[0, 0].numel() if transposed else cin * y[0, 0].numel()
    print(extra / max(x.numel(), y.numel()) / 4, extra / (columns * 3**nd * 4))
"""


# per kind (key): two convolutions (dimensions, input channels, output channels, side, stride,
# transposed) whose operands and column matrices scale differently (stride 1 and 2; transposed:
# the input or the output the larger), so that one basis explains both
_WORKSPACE_CASES = {
    "2": ((2, 16, 16, 330, 1, False), (2, 16, 16, 330, 2, False)),
    "3": ((3, 8, 8, 29, 1, False), (3, 8, 8, 29, 2, False)),
    "2t": ((2, 32, 16, 128, 2, True), (2, 16, 2, 128, 2, True)),
    "3t": ((3, 16, 8, 24, 2, True), (3, 32, 2, 24, 2, True)),
}
_QUICK_WORKSPACE_CASES = {  # a rough figure for tests: the convolutions' kinds only
    "2": ((2, 4, 8, 64, 1, False), (2, 4, 8, 64, 2, False)),
    "3": ((3, 2, 4, 12, 1, False), (3, 2, 4, 12, 2, False)),
}


def _workspace_probe(nd: int, cin: int, cout: int, side: int, stride: int, transposed: bool) -> tuple | None:
    """(workspace / larger operand, workspace / column matrix) of one convolution, in a fresh process."""
    import subprocess
    import sys

    code = _WORKSPACE_PROBE
    names = ("ND", "CIN", "COUT", "SIDE", "STRIDE", "TRANSPOSED")
    for key, value in zip(names, (nd, cin, cout, side, stride, transposed), strict=True):
        code = code.replace(key, str(value))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             timeout=120)  # fmt: skip
        operand, im2col = map(float, run.stdout.split())
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return operand, im2col


def _conv_workspace(quick: bool) -> dict[str, list]:
    """Bytes a CPU convolution holds besides its output, per dimensionality and for transposed
    convolutions apart ("2t", "3t"): a multiple of its larger operand (oneDNN converting layouts) or
    of its im2col matrix (generic kernels). Measured as peak RSS in fresh processes whose glibc
    returns freed memory at once, on two convolutions of each kind; the basis whose multiple the two
    agree on is kept. oneDNN's 2D transposed convolution holds twice its larger operand here (an
    upsampling 32 -> 2 channels at 193^2 in the perfmodel benchmark's UNet: 9.1 MiB besides its
    output, 2.0x its 4.6 MiB input; 32 -> 16 at 128^2: 2.0x its output), a convolution once."""
    out = dict(DEFAULT_WORKSPACE)
    for key, cases in (_QUICK_WORKSPACE_CASES if quick else _WORKSPACE_CASES).items():
        probes = [_workspace_probe(*case) for case in cases]
        if None in probes or min(min(p) for p in probes) <= 0:
            continue
        (op1, col1), (op2, col2) = probes
        spread = {"operand": abs(math.log(op1 / op2)), "im2col": abs(math.log(col1 / col2))}
        basis = min(spread, key=spread.get)
        out[key] = [basis, (op1 + op2) / 2 if basis == "operand" else (col1 + col2) / 2]
    return out


def measure(
    quick: bool = False,
    dtype: torch.dtype = torch.float32,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Rates of this CPU for `dtype` (about four minutes; `quick` takes seconds, for tests)."""
    min_time = 0.005 if quick else 0.01
    seconds = functools.partial(seconds_per_call, clock=clock)
    ops = {
        "dtype": str(dtype).removeprefix("torch."),
        "conv": _conv(dtype, quick, seconds, min_time),
        "stream": _stream(dtype, quick, seconds, min_time),
        "stream_backward": _stream_backward(dtype, quick, seconds, min_time),
        "pool": _pool(dtype, quick, seconds, min_time),
        "conv_workspace": _conv_workspace(quick),
    }
    ops["engine_node_s"], ops["engine_train_node_s"], ops["wake_s"] = engine_costs(quick, clock, ops, dtype)
    return ops


def calibrate(
    path: str | os.PathLike | None = None, quick: bool = False, clock: str = "wall", rounds: int = 1
) -> dict[str, Any]:
    """Measure this machine and store the result as JSON (about four minutes; `quick` a second, for tests).

    `clock="process"` times by CPU time rather than wall time: on a machine shared with other
    jobs it measures the work, not the waiting (use it with one thread, and time runs the same way).
    `rounds` > 1 measures that many times over and keeps each figure's best round
    (``calibration_rounds.best_of``): on a shared host, the speed the host gives when undisturbed.
    """
    if rounds < 1:
        raise ValueError(f"calibrate: rounds must be 1 or more, not {rounds}")
    measured = []
    for i in range(rounds):
        if rounds > 1:
            print(f"calibration round {i + 1} of {rounds}", flush=True)
        measured.append(_measure_all(quick, clock))
    cal = best_of(measured) if rounds > 1 else measured[0]
    target = calibration_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(cal, indent=1))
    tmp.replace(target)  # atomic: a concurrent reader sees the old file or the new one, never half
    return cal


def _measure_all(quick: bool, clock: str) -> dict[str, Any]:
    """One round of ``calibrate``: the whole calibration, not stored."""
    host_heap.keep()  # measured under the heap policy the tile interpreter runs under (it sets it)
    min_time = 0.01 if quick else 0.2
    sizes = [64, 128] if quick else [256, 512, 1024]
    cases = [((1, 8, 32, 32), (8, 8, 3, 3))] if quick else [
        ((1, 64, 56, 56), (64, 64, 3, 3)),
        ((1, 32, 128, 128), (32, 32, 3, 3)),
        ((1, 3, 224, 224), (64, 3, 7, 7)),
    ]  # fmt: skip
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    cal = {
        "version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "matmul": matmul_rates(sizes, dtypes, min_time),
        "conv2d": conv2d_rates(cases, min_time),
        "bandwidth_bytes_per_s": bandwidth((8 if quick else 256) * 2**20, min_time),
        "launch_overhead_s": launch_overhead(min_time),
        "clock": clock,
        # idle OpenMP threads spin or sleep: the per-op wake-up measured depends on it
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        # freed tensors' pages kept or handed back: a tiled run's page faults depend on it
        "host_heap": host_heap.policy(),
        "ops": measure(quick, torch.float32, CLOCKS[clock]),
    }
    return cal
