"""The convolutions a CPU calibration measures (``calibrate._conv``): the grid of shapes, and the
sides where torch switches kernels within a family of them. Split from ``calibrate.py``."""

from __future__ import annotations

import functools
import itertools

from bigpicture.perf.conv_rates import conv_backend


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
    # a segmentation head's last layers run on as few channels as it has classes: 2 in, few out (a
    # 2 -> 2 3x3 convolution's backward ran at half the rate of the 3 -> 2 one it was held at; in 3D
    # a 2 -> 2 3x3x3 one at ~5 GFLOP/s, half of what 1 and 4 input channels interpolate to)
    grid += [(nd, 2, cout, k, 1, side, False) for nd in (2, 3) for cout in (2, 8, 16) for k in (1, 3)
             for side in sides[nd]]  # fmt: skip
    # downsampling: channels kept or doubled, and from RGB (a UNet's first layer); a 7x7 stem on RGB.
    # Sides reach the tiles' (a 384 tile's first downsampling is 192 wide): beyond the grid a rate is
    # held at its last point, and there rates still change 1.3-2x (operands leaving the core's L2,
    # oneDNN's blocked-layout reorders of output and input growing with them)
    grid += [(2, cin, cout, k, 2, side, False) for cin in (3, 16, 32, 64, 128) for cout in (16, 32, 64, 128)
             if cout >= cin for k in (1, 3) for side in (8, 32, 96, 192)]  # fmt: skip
    grid += [(2, 3, cout, 7, 2, side, False) for cout in (16, 32, 64) for side in (8, 32, 128, 320)]
    grid += [(3, cin, cout, 3, 2, side, False) for cin in (1, 8, 16, 32) for cout in (8, 16, 32, 64)
             if cout >= cin for side in (8, 24)]  # fmt: skip
    # upsampling: channels kept or reduced, down to a segmentation head's few; the last upsampling
    # of a UNet (to its first level's few channels or its classes) is as wide as its tile's half
    grid += [(nd, cin, cout, k, 2, side, True) for nd in (2, 3) for cin in (8, 16, 32, 64, 128)
             for cout in (2, 8, 16, 32, 64) if cout <= cin for k in (2, 3)
             for side in ((8, 48) if nd == 2 else (4, 16)) + ((192,) if nd == 2 and cout <= 16 else ())
             ]  # fmt: skip
    grid += _switches(grid)
    # skip the few cases that would take seconds each; neighbours cover them
    return [g for g in grid if 2 * g[1] * g[2] * g[3] ** g[0] * g[5] ** g[0] <= 2e9]


def _backend_at(nd: int, cin: int, cout: int, k: int, stride: int, side: int, transposed: bool):
    """``conv_backend`` of a grid point, its input as ``_conv`` makes it."""
    n = side if transposed else (side - 1) * stride + k
    weight = (cin, cout) + (k,) * nd if transposed else (cout, cin) + (k,) * nd
    return conv_backend((1, cin) + (n,) * nd, weight, (stride,) * nd, (1,) * nd, 1, transposed)


def _switches(grid: list[tuple]) -> list[tuple]:
    """Per family of the grid (all but the side), the smallest side at which torch's kernel choice
    switches between two measured sides, where it is not measured already. A rate is interpolated
    within one kernel's points and held beyond its smallest: oneDNN's fixed cost per call makes its
    smallest convolutions far slower per flop than the smallest point above the switch said (64 ->
    128 1x1 / 2 on 10 x 10 outputs: 0.09 ms measured, 0.025 ms held from 32 x 32)."""
    sides: dict[tuple, list[int]] = {}
    for nd, cin, cout, k, stride, side, transposed in grid:
        sides.setdefault((nd, cin, cout, k, stride, transposed), []).append(side)
    added = []
    for (nd, cin, cout, k, stride, transposed), measured in sides.items():
        at = functools.partial(_backend_at, nd, cin, cout, k, stride, transposed=transposed)
        measured = sorted(set(measured))
        for a, b in itertools.pairwise(measured):
            above = at(side=b)
            if at(side=a) == above or above is None:
                continue
            lo, hi = a, b  # the kernel at lo differs from the one at hi: the first side with hi's
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if at(side=mid) == above else (mid, hi)
            if hi != b:
                added.append((nd, cin, cout, k, stride, hi, transposed))
    return added
