"""Split a captured graph, for one input shape, into the tiled part and the untiled rest.

Each node gets a role:

    const    does not depend on the input (parameters, buffers, functions of them)
    static   a Python value computed from shapes (``x.size(0)``), fixed for this input shape
    spatial  a local op of the spatial input: computed tile by tile
    reduce   a streamed reduction of a spatial node: combined over tiles
    tail     everything after: runs untiled on the boundary tensors

The spatial nodes that the tail (or a reduction) consumes are the *sinks*: each tile owns a
write box of each sink. A tail tensor that later tiles read (attention's output reshaped to the
image grid) is held whole and read through a ``stages.stage_source`` node, a spatial node of a
later pass (a global stage, ``stages.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import cached_property

import torch
from torch import fx
from torch.fx.node import map_aggregate

from bigpicture.engine import capture as g
from bigpicture.engine import rules
from bigpicture.engine import stages as staging
from bigpicture.engine.rules import shuffle
from bigpicture.errors import TilingError


class Context:
    """What rules may ask about the graph while a split is being made."""

    def __init__(
        self, gm: fx.GraphModule, values: dict, roles: dict, ndim: int, multipass: bool = True
    ) -> None:
        self.gm, self.values, self.roles = gm, values, roles
        self.ndim, self.nd = ndim, ndim - 2
        self.multipass = multipass  # whether global ops may take more passes over the tiles

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
    passes: dict  # node -> the pass over the tiles that computes it (spatial) or after which it is known
    derived: tuple = ()  # values from earlier passes that this pass's tiles use
    reasons: dict = field(default_factory=dict)  # pass k > 0 -> the global ops whose results it waits for
    sizes: dict = field(default_factory=dict)  # untiled node -> elements of its value (global stages)

    @cached_property
    def extents(self) -> dict:
        return {node: shape[2:] for node, shape in self.shapes.items()}

    @property
    def nd(self) -> int:
        return len(self.extents[self.input])


def split(gm: fx.GraphModule, values: dict, x: fx.Node, multipass: bool = True) -> Split:
    """``multipass=False``: one pass over the tiles; a global op in the middle is then an error.

    Where a spatial node meets a map of the whole image (a global stage's output: attention on
    tokens), the map is held whole and read by a later pass (``stages.materialise``), and the
    split is made again; each time one more tensor is held whole."""
    gm, values, x = shuffle.fold(gm, values, x)  # pixel shuffles spelt with view/permute/reshape
    tile_outputs = multipass  # an untiled decoder after a global stage: tiled in a later pass instead
    for _ in range(len(gm.graph.nodes)):
        try:
            return _split(gm, values, x, multipass, tile_outputs)
        except staging.Meets as meets:
            new, changed, x_new, made = staging.materialise(gm, values, x, meets, _lookup)
            if made:
                gm, values, x = new, changed, x_new
            elif meets.node.op == "output":
                tile_outputs = False  # what computes the output cannot read its inputs box by box
            else:
                raise AssertionError(f"{meets.node}: a whole-image map that cannot be held whole") from None
    raise AssertionError("each materialisation makes a whole tensor a source: there are finitely many")


def _lookup(gm, values, node, roles):
    return rules.lookup(node, Context(gm, values, roles, values[node].ndim))


def _split(gm: fx.GraphModule, values: dict, x: fx.Node, multipass: bool, tile_outputs: bool) -> Split:
    ndim = values[x].ndim
    roles: dict = {}
    ctx = Context(gm, values, roles, ndim, multipass)
    ops, statics, strides, sinks, reasons = {}, {}, {x: (Fraction(1),) * (ndim - 2)}, [], {}
    passes = {x: 0}  # spatial node: the pass that computes it; others: the pass after which it is known
    for node in gm.graph.nodes:
        roles[node] = role = _role(node, ctx, x)
        if role == "static":
            statics[node] = values[node]
        if role not in ("spatial", "reduce", "tail") or node is x:
            continue
        inputs = ctx.spatial_inputs(node)
        derived = [i for i in node.all_input_nodes if roles[i] in ("tail", "reduce")]
        passes[node] = max([passes[i] for i in inputs + derived], default=0)
        if role == "tail":
            sinks += [i for i in inputs if i not in sinks]
            continue
        try:
            op = ops[node] = rules.lookup(node, ctx)
        except TilingError:
            if derived:  # no rule, and fed by the whole image: say that first (`o.view_as(x)` of attention)
                _check_local(node, ctx, x, None, multipass)
                raise _whole_image_map(node, derived[0], ctx) from None
            raise
        if op.kind == "boundary":
            roles[node] = "tail"
            sinks += [i for i in inputs if i not in sinks]
        elif op.kind == "reduce":
            roles[node] = "reduce"
            sinks += [i for i in inputs if i not in sinks]
        else:
            _check_local(node, ctx, x, op, multipass)
            before = strides[inputs[0]] if inputs else (Fraction(1),) * (ndim - 2)  # a stage's source
            strides[node] = tuple(a * b for a, b in zip(before, op.stride))
            passes[node] = max([passes[i] for i in inputs] + [passes[d] + 1 for d in derived])
            if derived and passes[node] > max((passes[i] for i in inputs), default=-1):
                reasons.setdefault(passes[node], []).extend(_global_ops(node, derived, ctx))
    for node in gm.graph.nodes:
        if node.op == "output":
            sinks += [i for i in ctx.spatial_inputs(node) if i not in sinks]
            if tile_outputs:
                for i in node.all_input_nodes:
                    if staging.tiled_kind(i, values, x, lambda n, r: _lookup(gm, values, n, r), roles):
                        raise staging.Meets(node, i, ctx)
    if not sinks:
        raise TilingError("the model's outputs do not depend on the spatial input: nothing to tile.")
    for s in sinks:
        if not isinstance(values[s], torch.Tensor):
            raise TilingError(f"{ctx.where(s)}: a tuple of spatial tensors leaves the tiled part; return "
                              "its items instead.")  # fmt: skip
    shapes = {n: ctx.shape(n) for n in gm.graph.nodes if roles[n] == "spatial"}
    reasons = {k: tuple(dict.fromkeys(v)) for k, v in reasons.items()}
    sizes = {n: staging.elements(values[n]) for n in gm.graph.nodes if roles[n] in ("tail", "reduce")}
    return Split(gm, x, roles, ops, statics, strides, tuple(sinks), (), shapes, passes, reasons=reasons,
                 sizes=sizes)  # fmt: skip


def stages(whole: Split) -> list[Split]:
    """One split per pass over the tiles: the sinks it computes and the nodes they need.

    Without global ops there is one pass. Each op that combines spatial features with a value
    known only after a pass (image statistics, squeeze-excitation) starts a later one.
    """
    count = 1 + max(whole.passes[k] for k in whole.sinks)
    out = []
    for k in range(count):
        sinks = tuple(s for s in whole.sinks if whole.passes[s] == k)
        if not sinks:
            continue
        needed = _ancestors(sinks, whole.roles)
        order = tuple(n for n in whole.gm.graph.nodes if n in needed)
        derived = tuple(n for n in order if whole.roles[n] in ("tail", "reduce"))
        order = tuple(n for n in order if whole.roles[n] in ("spatial", "const"))
        out.append(replace(whole, sinks=sinks, order=order, derived=derived))
    return out


def _role(node, ctx: Context, x) -> str:
    if node is x or staging.is_source(node):
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


def _check_local(node, ctx: Context, x, op, multipass: bool) -> None:
    derived = [i for i in node.all_input_nodes if ctx.roles[i] in ("tail", "reduce")]
    if derived and not multipass:
        raise TilingError(
            f"{ctx.where(node)} combines the spatial features with {ctx.where(derived[0])}, which depends on "
            "the whole image (a global op such as squeeze-excitation, or attention over tokens) in the "
            "middle of the local part, and multipass=False allows one pass over the tiles only. Without "
            "multipass=False (the default) bigpicture makes it exact with one more pass over the tiles per "
            "such op (a map such as attention's output held whole between passes: a global stage); or "
            "move the op after the tiled part."
        )
    for d in derived:  # a reduction's own result has the shape its rule gives; the tail's is anything
        value = ctx.values[d]
        mapped = ctx.roles[d] == "tail" and isinstance(value, torch.Tensor) and value.ndim == ctx.ndim
        if mapped and any(n > 1 for n in value.shape[2:]) and not staging.is_source(node):
            if staging.grid(value, ctx.values[x]):  # held whole, read by a later pass's tiles
                raise staging.Meets(node, d, ctx)
            raise _whole_image_map(node, d, ctx)
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


def _whole_image_map(node, d, ctx: Context) -> TilingError:
    value = ctx.values[d]
    shape = f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
    return TilingError(
        f"{ctx.where(node)} combines the spatial features with {ctx.where(d)}, a map{shape} computed "
        "from the whole image (attention, or a global op whose result is resampled to the image), which "
        "tiles cannot compute exactly. Only per-channel values of the whole image (statistics, "
        "squeeze-excitation) can be used by later tiles; place such an op after a global pooling."
    )


def _global_ops(node, derived, ctx: Context) -> list[str]:
    """Names of the streamed reductions in the middle of the network whose results ``node`` uses."""
    if "bigpicture_origin" in node.meta:  # a global norm, rewritten into statistics and a normalize
        return [node.meta["bigpicture_origin"]]
    if staging.is_source(node):  # a whole tensor from an untiled subgraph
        return [staging.reason(node, ctx)]
    found, todo, seen = [], list(derived), set()
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        if ctx.roles[d] == "reduce":
            target = f" `{d.target}`" if d.op == "call_module" else f" `{d.name}`"
            found.append(d.meta.get("bigpicture_origin", ctx.op_name(d) + target))
        elif ctx.roles[d] == "tail":
            todo.extend(d.all_input_nodes)
    return sorted(found)


def keep_origins(gm: fx.GraphModule, rewrite) -> int:
    """Run ``rewrite(gm)`` (which replaces modules by equivalent nodes) and name each replacement by
    the module it replaced (``node.meta["bigpicture_origin"]``), for plans to say why passes exist.
    A replacement is the new node that took over the replaced node's users."""
    before = set(gm.graph.nodes)
    labels = [
        (n, set(n.users), f"{type(gm.get_submodule(n.target)).__name__} `{n.target}`")
        for n in gm.graph.nodes
        if n.op == "call_module"
    ]
    count = rewrite(gm)
    after = set(gm.graph.nodes)
    labels = [(users, label) for n, users, label in labels if n not in after]  # the replaced ones
    for node in gm.graph.nodes:
        if node in before:
            continue
        k = next((k for k, (users, _) in enumerate(labels) if users and users == set(node.users)), None)
        if k is not None:
            node.meta["bigpicture_origin"] = labels.pop(k)[1]
    return count


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return False


def _ancestors(sinks, roles) -> set:
    """Spatial nodes the sinks depend on, with the const nodes and computed values they use."""
    needed, todo = set(), list(sinks)
    while todo:
        node = todo.pop()
        if node in needed:
            continue
        needed.add(node)
        if roles[node] in ("spatial", "const"):
            todo.extend(node.all_input_nodes)
    return {n for n in needed if roles[n] in ("spatial", "const", "tail", "reduce")}
