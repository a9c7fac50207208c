"""Split a captured graph, for one input shape, into the tiled part and the untiled rest.

Each node gets a role:

    const    does not depend on the input (parameters, buffers, functions of them)
    static   a Python value computed from shapes (``x.size(0)``), fixed for this input shape
    spatial  a local op of the spatial input: computed tile by tile
    reduce   a streamed reduction of a spatial node: combined over tiles
    tail     everything after: runs untiled on the boundary tensors

The spatial nodes that the tail (or a reduction) consumes are the *sinks*: each tile owns a
write box of each sink.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

import torch
from torch import fx
from torch.fx.node import map_aggregate

from . import graph as g
from . import rules
from .errors import TilingError


class Context:
    """What rules may ask about the graph while a split is being made."""

    def __init__(self, gm: fx.GraphModule, values: dict, roles: dict, ndim: int) -> None:
        self.gm, self.values, self.roles = gm, values, roles
        self.ndim, self.nd = ndim, ndim - 2

    def meta(self, node):
        return self.values[node] if isinstance(node, fx.Node) else node

    def shape(self, node) -> tuple[int, ...]:
        value = self.meta(node)
        value = value[0] if isinstance(value, (tuple, list)) else value
        return tuple(value.shape)

    def extent(self, node) -> tuple[int, ...]:
        return self.shape(node)[2:]

    def dtype(self, node) -> torch.dtype:
        value = self.meta(node)
        return (value[0] if isinstance(value, (tuple, list)) else value).dtype

    def module(self, node) -> torch.nn.Module:
        return self.gm.get_submodule(node.target)

    def spatial_inputs(self, node) -> list[fx.Node]:
        return [i for i in node.all_input_nodes if self.roles.get(i) == "spatial"]

    def static(self, arg):
        """The value of an argument known before any tile runs (literals and shape arithmetic)."""

        def value(a):
            if not isinstance(a, fx.Node):
                return a
            v = self.values[a]
            if isinstance(v, torch.Tensor):
                raise TilingError(f"{self.where(a)}: a tensor is used where bigpicture needs a value fixed "
                                  "before the first tile (a size, a dimension, a flag).")  # fmt: skip
            return v

        return map_aggregate(arg, value)

    def callable(self, node):
        return lambda args, kwargs: g.call(self.gm, node, args, kwargs)

    def op_name(self, node) -> str:
        return g.op_name(self.gm, node)

    def where(self, node) -> str:
        return g.describe(self.gm, node)


@dataclass(frozen=True)
class Split:
    gm: fx.GraphModule
    input: fx.Node
    roles: dict
    ops: dict  # node -> rules.Op, for spatial and reduce nodes
    statics: dict  # node -> value fixed for this input shape
    strides: dict  # spatial node -> input pixels per node pixel, per spatial dimension
    sinks: tuple  # spatial nodes whose values leave the tiled part
    order: tuple  # spatial and const nodes in topological order, as tiles compute them
    shapes: dict  # spatial node -> full shape (N, C, *spatial) for this input

    @cached_property
    def extents(self) -> dict:
        return {node: shape[2:] for node, shape in self.shapes.items()}

    @property
    def nd(self) -> int:
        return len(self.extents[self.input])


def split(gm: fx.GraphModule, values: dict, x: fx.Node) -> Split:
    ndim = values[x].ndim
    roles: dict = {}
    ctx = Context(gm, values, roles, ndim)
    ops, statics, strides, sinks = {}, {}, {x: (Fraction(1),) * (ndim - 2)}, []
    for node in gm.graph.nodes:
        roles[node] = role = _role(node, ctx, x)
        if role == "static":
            statics[node] = values[node]
        if role not in ("spatial", "reduce", "tail") or node is x:
            continue
        inputs = ctx.spatial_inputs(node)
        if role == "tail":
            sinks += [i for i in inputs if i not in sinks]
            continue
        op = ops[node] = rules.lookup(node, ctx)
        if op.kind == "boundary":
            roles[node] = "tail"
            sinks += [i for i in inputs if i not in sinks]
        elif op.kind == "reduce":
            roles[node] = "reduce"
            sinks += [i for i in inputs if i not in sinks]
        else:
            _check_local(node, ctx, x, op)
            strides[node] = tuple(a * b for a, b in zip(strides[inputs[0]], op.stride))
    for node in gm.graph.nodes:
        if node.op == "output":
            sinks += [i for i in ctx.spatial_inputs(node) if i not in sinks]
    if not sinks:
        raise TilingError("the model's outputs do not depend on the spatial input: nothing to tile.")
    for s in sinks:
        if not isinstance(values[s], torch.Tensor):
            raise TilingError(f"{ctx.where(s)}: a tuple of spatial tensors leaves the tiled part; return "
                              "its items instead.")  # fmt: skip
    needed = _needed_by_tiles(gm, roles)
    order = tuple(n for n in gm.graph.nodes if roles[n] == "spatial" or n in needed)
    shapes = {n: ctx.shape(n) for n in gm.graph.nodes if roles[n] == "spatial"}
    return Split(gm, x, roles, ops, statics, strides, tuple(sinks), order, shapes)


def _role(node, ctx: Context, x) -> str:
    if node is x:
        return "spatial"
    if node.op in ("placeholder", "get_attr"):
        return "const"
    if node.op == "output":
        return "output"
    value = ctx.values[node]
    if not _has_tensor(value):
        return "static"
    roles = {ctx.roles[i] for i in node.all_input_nodes}
    if roles <= {"const", "static"}:
        return "const"
    return "spatial" if "spatial" in roles else "tail"


def _check_local(node, ctx: Context, x, op) -> None:
    derived = [i for i in node.all_input_nodes if ctx.roles[i] in ("tail", "reduce")]
    if derived:
        raise TilingError(
            f"{ctx.where(node)} combines the spatial features with {ctx.where(derived[0])}, which depends on "
            "the whole image (a global op such as squeeze-excitation or attention) in the middle of the "
            "local part. Exact tiling of global ops is not supported yet."
        )
    value, first = ctx.values[node], ctx.values[x]
    tensor = value[0] if isinstance(value, (tuple, list)) else value
    if tensor.ndim != first.ndim or tensor.shape[0] != first.shape[0]:
        raise TilingError(
            f"{ctx.where(node)} changes the layout (N, C, *spatial) to {tuple(tensor.shape)}; "
            "bigpicture tiles ops that keep batch first and channels second."
        )
    for i in ctx.spatial_inputs(node):
        if isinstance(op, rules.Pointwise) and ctx.extent(i) != ctx.extent(node):
            raise TilingError(
                f"{ctx.where(node)} combines spatial tensors of shapes {ctx.extent(i)} and "
                f"{ctx.extent(node)}; pointwise ops need equal spatial shapes (no spatial broadcasting)."
            )


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return False


def _needed_by_tiles(gm, roles) -> set:
    """Const nodes that spatial nodes use, directly or through other const nodes."""
    needed: set = set()
    for node in reversed(list(gm.graph.nodes)):
        if roles[node] == "spatial" or node in needed:
            needed.update(i for i in node.all_input_nodes if roles[i] == "const")
    return needed
