"""The untiled work of a pass: its forward flops with every node on its whole box, against which
``predict`` measures a tile plan's halo overhead.

A step's flops are its convolution's (``conv_work``: no other op is charged any), a function of the
convolution, its output's and input's shapes and its whole box alone: no rates, no gradient, no
dtype, so no step is built. A squeeze-and-excitation network takes a pass per squeeze, each
recomputing every node before it (SEResNet101: 34 passes, up to 405 nodes each), so a convolution's
flops are asked once per graph, and each pass sums its own nodes': the sum of ``walk.walk``'s over
the whole image, as walking each pass on its own gives it (``tests/test_plan_passes.py``; against
the steps built, ``tests/test_step_memo_fast.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from bigpicture.engine.box import Box
from bigpicture.engine.rules.resample import ConvTranspose
from bigpicture.engine.rules.window import Conv
from bigpicture.engine.split import Split
from bigpicture.perf.conv_work import conv_work
from bigpicture.perf.rates import Rates


def untiled_flops(split: Split, dtype: torch.dtype, rates: Rates, memo: dict) -> int:
    """``walk.walk(split, whole, (), dtype, rates, False, False, False).flops_fwd``: the forward
    flops of ``split`` with every node computing its whole box (``dtype`` and ``rates`` change no
    step's flops). ``memo``: kept between the passes of one graph (a convolution's flops by its key)."""
    total = 0
    for node in split.order:  # the nodes ``walk.grads`` walks (spatial, a non-empty whole box) that convolve
        op = split.ops.get(node)
        if not isinstance(op, (Conv, ConvTranspose)) or split.roles[node] != "spatial" or node is split.input:
            continue
        extents = tuple(split.extents[node])
        if min(extents, default=1) <= 0:
            continue
        key = (node, op, split.shapes[node], split.shapes[tuple(op.inputs)[0]], extents)
        flops = memo.get(key)
        if flops is None:
            flops = memo[key] = _whole_flops(split, node, op, extents)
        total += flops
    return total


def _whole_flops(split: Split, node, op, extents: tuple) -> int:
    """The flops of convolution ``node`` on its whole box, as ``steps._step`` builds its one row."""
    box, transposed = Box.from_shape(extents), isinstance(op, ConvTranspose)
    extra = op.needs(box)[0].shape if transposed else (1,) * split.nd
    (n, c), cin = split.shapes[node][:2], split.shapes[tuple(op.inputs)[0]][1]
    numel, extra = np.array([box.numel], dtype=np.int64), np.array([extra], dtype=np.int64)
    return int(conv_work(op, transposed, n, cin, c, numel, extra)[2][0])
