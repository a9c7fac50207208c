"""A convolution's work on rows: what ``steps._conv_steps`` charges it (its flops, over the positions
of its box, a transposed convolution's over those of its input box), and ``untiled.untiled_flops``
sums over the whole image (a step's flops are its convolution's: no other op is charged any)."""

from __future__ import annotations

import math

import numpy as np


def conv_work(op, transposed: bool, n: int, cin: int, c: int, numel: np.ndarray, extra: np.ndarray):
    """(fan_in, positions, flops) of convolution ``op`` per row (int64 arrays): ``n`` images of
    ``cin`` input and ``c`` output channels, ``numel`` positions of its box, ``extra`` (rows, nd) the
    lengths of a transposed convolution's input box."""
    if not transposed:
        fan_in, positions = op.cin_per_group * math.prod(op.kernel), n * numel
    else:  # every input position scatters cin x cout/groups x kernel multiply-adds
        fan_in, positions = cin * math.prod(op.kernel), n * extra.prod(axis=1)
    return fan_in, positions, 2 * positions * fan_in * c // (op.groups if transposed else 1)
