"""``regions.needs`` as it was before its reverse walk was kept per split (test_regions_fast.py).

The reverse walk: from the write boxes of the sinks to the box every node must compute.

A node's *needs* is the hull of what its users need from it (and its own write box if it is
a sink). Walking the spatial nodes in reverse topological order gives, for one tile, the
box of every node, down to the input's read box.
"""

from __future__ import annotations

from bigpicture.engine.box import Box
from bigpicture.engine.split import Split


def needs(split: Split, writes: dict) -> dict:
    """The box each spatial node computes for one tile, given the write box of each sink."""
    empty = Box((0,) * split.nd, (0,) * split.nd)
    need: dict = {}
    asked: dict = {}  # user -> the boxes it needs of its inputs: asked once, not once per input (a concat)
    for node in reversed(split.order):
        if split.roles[node] != "spatial":
            continue
        box = writes.get(node, empty)
        for user in node.users:
            if user not in need or need[user].empty:  # not spatial, or computed in another pass
                continue
            if user not in asked:
                op = split.ops[user]
                asked[user] = op.needs(need[user]), op.inputs
            boxes, inputs = asked[user]
            box = box.hull(boxes[inputs.index(node)])
        need[node] = box
    need.setdefault(split.input, empty)  # a pass that reads only a global stage's outputs
    return need


def receptive_field(split: Split) -> tuple[int, ...]:
    """Input pixels that one output pixel in the middle of the first sink depends on."""
    sink = split.sinks[0]
    center = tuple(n // 2 for n in split.extents[sink])
    box = needs(split, {sink: Box(center, tuple(c + 1 for c in center))})[split.input]
    return box.shape
