"""``steps._conv_steps`` as it was before ``conv_rates`` (each row's kernel family and rate asked on
its own, through ``rates.conv_backend``'s cache): the reference of ``test_step_rates_fast.py``."""

from __future__ import annotations

import math

import numpy as np

from bigpicture.engine.rules.resample import ConvTranspose
from bigpicture.perf.conv_rates import conv_backend
from bigpicture.perf.rates import Rates


def old_backend(op, shape: tuple, n: int, cin: int, cout: int, transposed: bool, rates: Rates) -> str | None:
    """``step_rates._backend`` as it was."""
    if rates.gpu or not rates.measured:
        return None
    weight = (cin, cout // op.groups) if transposed else (cout, cin // op.groups)
    return conv_backend((n, cin) + shape, weight + tuple(op.kernel), tuple(op.step), tuple(op.dilation),
                        op.groups, transposed, rates.dtype)  # fmt: skip


def old_conv_steps(split, op, st, rows, n: int, c: int, item: int, rates: Rates, grad_in) -> None:
    """``steps._conv_steps`` as it was."""
    ins, nd = tuple(op.inputs), split.nd
    transposed = isinstance(op, ConvTranspose)
    st.kind[:], st.saves_inputs, stride = "conv", np.ones(len(rows.numel), dtype=bool), max(op.step)
    cin = split.shapes[ins[0]][1]
    if not transposed:
        fan_in, positions = op.cin_per_group * math.prod(op.kernel), n * rows.numel
    else:
        fan_in, positions = cin * math.prod(op.kernel), n * rows.extra.prod(axis=1)
    st.flops = 2 * positions * fan_in * c // (op.groups if transposed else 1)
    read = n * cin * (rows.padded if not transposed else rows.extra).prod(axis=1) * item
    im2col = n * (c * positions // n if transposed else cin * rows.numel) * math.prod(op.kernel) * item
    st.temp = st.temp + rates.workspaces(nd, np.maximum(read, st.out), im2col, transposed)
    st.flops_bwd = st.flops * (2 if grad_in else 1)
    case = (transposed, cin // (1 if transposed else op.groups), math.prod(op.kernel))
    lengths = (rows.extra if transposed else rows.padded).tolist()
    live = [k for k, p in enumerate(positions.tolist()) if p != 0]
    backends = [old_backend(op, tuple(lengths[k]), n, cin, c, transposed, rates) for k in live]
    fwd, bwd = np.ones(len(lengths)), np.ones(len(lengths))
    if live:
        at = [int(positions[k]) for k in live]
        fwd[live] = rates.convs(nd, fan_in, c, at, stride, False, *case, backends)
        bwd[live] = rates.convs(nd, fan_in, c, at, stride, True, *case, backends)
    st.fwd_s, st.bwd_s = st.flops / fwd, st.flops_bwd / bwd
