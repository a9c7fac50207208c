"""The reverse walk: from the write boxes of the sinks to the box every node must compute.

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
    live: dict = {}  # the nodes of non-empty boxes (an empty one is computed in another pass)
    asked: dict = {}  # user -> the boxes it needs of its inputs: asked once, not once per input (a concat)
    for node, users in _reverse(split):
        box = writes.get(node, empty)
        for user, i in users:
            box_user = live.get(user)
            if box_user is None:
                continue
            boxes = asked.get(user)
            if boxes is None:
                boxes = asked[user] = split.ops[user].needs(box_user)
            box = box.hull(boxes[i if i is not None else split.ops[user].inputs.index(node)])
        need[node] = box
        if not box.empty:
            live[node] = box
    need.setdefault(split.input, empty)  # a pass that reads only a global stage's outputs
    return need


def _reverse(split: Split) -> list:
    """The spatial nodes in reverse order, each with its spatial users and its place among their
    inputs: [(node, ((user, index), ...))], made once per split (``needs`` runs per tile walked; a
    DenseNet's concatenations have dozens of inputs, each found by ``list.index`` before)."""
    found = _REVERSE.get(id(split))
    if found is None or found[0] is not split:
        if len(_REVERSE) >= 128:
            _REVERSE.pop(next(iter(_REVERSE)))
        spatial = {n for n in split.order if split.roles[n] == "spatial"}
        walk = [
            (node, tuple((u, _index(split.ops[u].inputs, node)) for u in node.users if u in spatial))
            for node in reversed(split.order)
            if node in spatial
        ]
        found = _REVERSE[id(split)] = (split, walk)  # the split is kept, so its id is not reused while cached
    return found[1]


_REVERSE: dict = {}


def _index(inputs, node) -> int | None:
    """Where ``node`` first is among ``inputs`` (None if not: ``needs`` then fails as ``list.index`` does)."""
    return inputs.index(node) if node in inputs else None


def receptive_field(split: Split) -> tuple[int, ...]:
    """Input pixels that one output pixel in the middle of the first sink depends on."""
    sink = split.sinks[0]
    center = tuple(n // 2 for n in split.extents[sink])
    box = needs(split, {sink: Box(center, tuple(c + 1 for c in center))})[split.input]
    return box.shape
