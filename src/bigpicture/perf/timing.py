"""Timing on this machine: the best time per call, and the coarse figures of the device table's
local entry (matmul and convolution rates, copy bandwidth, per-op overhead)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch

CLOCKS: Mapping[str, Callable[[], float]] = MappingProxyType(
    {"wall": time.perf_counter, "process": time.process_time}
)


def seconds_per_call(
    fn: Callable[[], object], min_time: float, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Best time per call, with enough calls per trial that timer resolution does not matter."""
    fn()  # warm-up: first calls pay for allocation and kernel selection
    calls, best = 1, float("inf")
    for trial in range(20):
        start = clock()
        for _ in range(calls):
            fn()
        elapsed = clock() - start
        best = min(best, elapsed / calls)
        # the best of five at least: other jobs only add time, and on a shared host the speed of
        # one and the same call swings by a quarter from one moment to the next
        if elapsed >= min_time and trial >= 4:
            return best
        if elapsed < min_time:
            calls *= 2
    return best


def matmul_rates(sizes: list[int], dtypes: list[torch.dtype], min_time: float) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for dt in dtypes:
        out[str(dt).removeprefix("torch.")] = {}
        for n in sizes:
            a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
            s = seconds_per_call(lambda a=a, b=b: a @ b, min_time)
            out[str(dt).removeprefix("torch.")][str(n)] = 2 * n**3 / s
    return out


def conv2d_rates(
    cases: list[tuple[tuple[int, ...], tuple[int, ...]]], min_time: float
) -> list[dict[str, Any]]:
    out = []
    for x_shape, w_shape in cases:
        x, w = torch.randn(x_shape), torch.randn(w_shape)
        s = seconds_per_call(lambda x=x, w=w: torch.conv2d(x, w, padding="same"), min_time)
        # same padding keeps H x W, so this is 2 * N * Cout * H * W * Cin * kh * kw
        flops = 2 * x_shape[0] * x_shape[2] * x_shape[3] * w_shape[0] * w_shape[1] * w_shape[2] * w_shape[3]
        out.append({"input": list(x_shape), "weight": list(w_shape), "flops_per_s": flops / s})
    return out


def bandwidth(nbytes: int, min_time: float) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / seconds_per_call(lambda: dst.copy_(src), min_time)  # a copy reads and writes


def launch_overhead(min_time: float) -> float:
    a, b, c = torch.ones(1), torch.ones(1), torch.empty(1)
    return seconds_per_call(lambda: torch.add(a, b, out=c), min_time)
