"""The untiled work of a pass: its forward flops with every node on its whole box, against which
``predict`` measures a tile plan's halo overhead.

A squeeze-and-excitation network takes a pass per squeeze, each recomputing every node before it
(SEResNet101: 34 passes, up to 405 nodes each), so the same node's untiled step comes up in pass
after pass. Its flops are asked once per graph, keyed by everything its step reads (its op, its
shape and its inputs', which of them the pass computes, whether one needs a gradient), and
each pass sums its own nodes': the sum of ``walk.walk``'s over the whole image, as walking each
pass on its own gives it (``tests/test_plan_passes.py``).
"""

from __future__ import annotations

import torch

from bigpicture.engine.box import Box
from bigpicture.engine.split import Split
from bigpicture.perf.rates import Rates
from bigpicture.perf.steps import node_step
from bigpicture.perf.walk import grad_in, grads


def untiled_flops(split: Split, dtype: torch.dtype, rates: Rates, memo: dict) -> int:
    """``walk.walk(split, whole, (), dtype, rates, False, False, False).flops_fwd``: the forward
    flops of ``split`` with every node computing its whole box. ``memo``: kept between the passes of
    one graph with these ``rates`` (a node's flops under its key)."""
    whole = {n: Box.from_shape(e) for n, e in split.extents.items()}
    grad = grads(split, whole, False)  # the image first: it has no step
    item, fused = torch.empty((), dtype=dtype).element_size(), getattr(rates, "fused", False)
    total = 0
    for node in list(grad)[1:]:
        op, needs_grad = split.ops[node], grad_in(split, node, grad)
        inputs = tuple((i, i is split.input, split.shapes.get(i)) for i in op.inputs)
        key = (node, op, split.shapes[node], inputs, needs_grad, item, split.sinks if fused else None)
        if key not in memo:
            memo[key] = node_step(split, node, whole, needs_grad, False, item, rates, {}).flops
        total += memo[key]
    return total
