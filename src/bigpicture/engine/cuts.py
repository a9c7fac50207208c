"""Cuts: the network divided at chosen nodes into stages, each tiled with its own, smaller halo.

A tile of a deep network reads its write box grown by the whole receptive field, so small tiles
recompute most of their input's neighbourhood. Cutting at a node keeps that node's whole value
(in a tier: ``held.py``) between two passes over the tiles, and the later pass's tiles read it box
by box with only the halo of the layers after the cut:

    before   x --[ layers 1..n: one receptive field ]--> y
    after    x --[ layers 1..k ]--> cut (whole, in a tier) --[ layers k+1..n ]--> y

A cut is a global stage whose untiled subgraph is the identity (``stages.py``): a ``stage_hold``
node (a boundary, so the cut node is the earlier pass's dense sink) and a ``stage_source`` after it
that the cut node's users read instead. Gradients flow back through the same machinery: each later
tile's crop gradient is added into the held tensor's gradient, which is the earlier pass's sink
gradient. Exact by construction: no value is computed differently, only where it is kept.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import fx

from bigpicture.engine.held import is_hold, stage_hold, tier
from bigpicture.engine.stages import grid, is_source, size, stage_source
from bigpicture.engine.tiles import Diagonal
from bigpicture.errors import TilingError


def cut(gm: fx.GraphModule, at: Iterable[str] | Mapping[str, str], default_tier="host") -> fx.GraphModule:
    """A copy of ``gm`` cut at the nodes named in ``at`` (node names as ``print(plan)`` and
    ``cut_names`` give them, or a module's path when it is called once); a mapping gives each
    cut its tier ("device", "host" or "zarr"), else ``default_tier``."""
    tiers = dict(at) if isinstance(at, Mapping) else dict.fromkeys(at, default_tier)
    if not tiers:
        return gm
    nodes = {name: find(gm, name) for name in tiers}
    graph, remap = fx.Graph(), {}
    graph.output(graph.graph_copy(gm.graph, remap))
    old_out = next(n for n in gm.graph.nodes if n.op == "output")
    remap[old_out] = next(n for n in graph.nodes if n.op == "output")
    for name, node in nodes.items():
        node = remap[node]
        with graph.inserting_after(node):
            hold = graph.call_function(stage_hold, (node,), {"tier": tier(tiers[name]).name})
        with graph.inserting_after(hold):
            source = graph.call_function(stage_source, (hold,))
        for n in (hold, source):
            n.meta.update(node.meta)
        for user in [u for u in node.users if u is not hold]:
            user.replace_input_with(node, source)
    new = fx.GraphModule(gm, graph, type(gm).__name__)
    new.meta.update(gm.meta)
    return new


def find(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node a cut names: by node name, else the one call of the module at that path (for a
    module the capture inlines, the one node its value leaves it by)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    if name in by_name and by_name[name].op not in ("placeholder", "output", "get_attr"):
        return by_name[name]
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
    if not calls:  # a module of the user's own, inlined by the capture: the node its value leaves by
        inside = {n for n in gm.graph.nodes if name in (n.meta.get("nn_module_stack") or {})}
        calls = [n for n in inside if any(u not in inside for u in n.users)]
    if len(calls) == 1:
        return calls[0]
    names = [n.name for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    if len(calls) > 1:
        raise TilingError(
            f"cuts: module `{name}` is called {len(calls)} times ({', '.join(n.name for n in calls)}); "
            "name the call to cut after by its node name instead."
        )
    close = difflib.get_close_matches(name, names, n=5) or names[-5:]
    raise TilingError(
        f"cuts: the graph has no node or module called `{name}`. Cut at a node of the tiled part by its "
        f"name (`bigpicture.engine.cuts.cut_names(plan)` lists them), e.g. {', '.join(close)}; or give "
        'cuts="auto" for the planner\'s choice.'
    )


def check(gm, values: dict, x, roles: dict | None = None) -> None:
    """A ``TilingError`` for a cut at a node the tiles do not compute (after a global pooling,
    or one that does not depend on the image): there is nothing to keep between passes. Before
    the split (``roles`` None) by the layout of its value, after it by its role."""
    for hold in (n for n in gm.graph.nodes if is_hold(n)):
        node = hold.args[0]
        role = "tiled" if roles is None else roles.get(node)
        if roles is None and not grid(values[node], values[x]):
            role = "untiled"
        if role not in ("tiled", "spatial") or node is x:
            what = "the input itself" if node is x else f"a {role} node, not a tiled one"
            raise TilingError(
                f"cuts: `{node.name}` is {what}; a cut keeps a tiled node's whole value between passes. "
                f"Cut at a node between the input and the last tiled layer (see `cut_names(plan)`)."
            )


def cut_names(plan) -> list[str]:
    """The names of the nodes a plan's tiles compute, in order: where ``cuts=`` may cut."""
    s = plan.split
    return [n.name for n in s.gm.graph.nodes if s.roles.get(n) == "spatial" and n is not s.input
            and not is_hold(n)]  # fmt: skip


@dataclass(frozen=True)
class Traffic:
    """One cut's whole tensor in its tier, and the bytes a step moves between it and the device."""

    node: str
    shape: tuple[int, ...]
    tier: str
    held: int  # bytes of the whole tensor (its gradient, in training, as many again)
    moved: int  # bytes per step: written by the earlier pass, read by the later one's tiles

    def __str__(self) -> str:
        return (f"`{self.node}` {self.shape} in {self.tier}: {size(self.held)} held, "
                f"{size(self.moved)} moved per step")  # fmt: skip


def traffic(passes, item: int, training: bool) -> list[Traffic]:
    """Per cut, over ``passes`` (each a split and its ``tiles.Layout``): what is held and moved.

    Inference: the earlier pass writes the whole tensor once (its write boxes partition it); the
    later pass's tiles read their crops (the whole grown by the later stage's halo). Training adds
    the recompute's reads of the crops (the kept last tile's aside: counted anyway), the crops'
    gradients written back, and the earlier pass's backward reading the whole gradient: 2 x held
    + 3 x crops."""
    crops: dict = {}  # hold node -> (its source's shape, bytes of crops read over the passes)
    for split, lay in passes:  # a cut read by several passes (a U-Net's skip) is read by each
        diagonal = Diagonal(split, lay)
        for source in (n for n in split.order if is_source(n) and is_hold(n.args[0])):
            shape = tuple(split.shapes[source])
            read = shape[0] * shape[1] * item
            for d in range(split.nd):
                read *= sum(diagonal.row(j)[1][source].dim(d)[1] - diagonal.row(j)[1][source].dim(d)[0]
                            for j in range(lay.grid[d]))  # fmt: skip
            crops[source.args[0]] = (shape, crops.get(source.args[0], (shape, 0))[1] + read)
    out = []
    for hold, (shape, read) in crops.items():
        held = math.prod(shape) * item
        moved = 2 * held + 3 * read if training else held + read
        out.append(Traffic(hold.args[0].name, shape, hold.kwargs.get("tier", "host"), held, moved))
    return out


def plan_traffic(plan) -> list[Traffic]:
    """``traffic`` of a plan's passes, in its dtype and mode."""
    item = torch.empty((), dtype=plan.dtype).element_size()
    return traffic([(p.split, p.tiles.lay) for p in (*plan.earlier, plan)], item, plan.training)
