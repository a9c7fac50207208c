"""Global stages: an untiled subgraph between two passes over the tiles, on tensors held whole.

Self-attention over all tokens, LayerNorm over tokens, flatten -> linear: each output position
depends on every input position, so no tile can compute it. When such a subgraph acts on small
tensors (the tokens of a patch embedding at 1/16 resolution), the engine holds them whole:

    pass 0 tiles  --gather-->  whole tensors  --untiled subgraph (autograd)-->  whole tensors
                                                                                   |  scatter
    pass 1 tiles  <--each tile slices the box it needs (``stage_source``)----------+

The gather is an ordinary dense sink (each tile writes its write box; its gradient is sliced
per tile). The untiled subgraph is the split's tail, run by ``evaluator.Evaluator`` between
passes. The scatter is a ``stage_source`` node inserted after each whole tensor that tiles
read: a spatial node with no spatial input, whose value on a box is that box of the whole
tensor, at its own scale (a stride of input pixels per position, like any node). A tile's
graph slices a leaf of the whole tensor, so its gradient is summed over the tiles and then
flows through the subgraph by autograd into the earlier pass (``execute.TiledFunction``).

Where the whole tensors end is chosen by walking back from the spatial node that first meets
a whole-image map: every op before it that has a local rule, on tensors laid out
(N, C, *spatial), runs tiled in the later pass instead of untiled (UNETR's decoder reads the
tokens reshaped to a grid, not its own upsampled feature maps).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import fx

from bigpicture.engine.capture import op_name
from bigpicture.engine.held import Crop, is_hold
from bigpicture.engine.rules import Op, rule


def stage_source(whole: torch.Tensor) -> torch.Tensor:
    """A tensor held whole (a global stage's output) that a later pass's tiles read box by box."""
    return whole


class Source(Op):
    """``stage_source``: no spatial input; a box of it is that box of the whole tensor."""

    why_not_background = "a pass reads a global stage's output, which differs from tile to tile"

    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        x = next(n for n in ctx.gm.graph.nodes if n.op == "placeholder")
        self._stride = tuple(Fraction(a, b) for a, b in zip(ctx.extent(x), ctx.extent(node)))

    @property
    def stride(self):
        """Input pixels per position: the whole tensor's scale against the input's."""
        return self._stride

    def needs(self, out):
        return []

    def run(self, out, args, kwargs):
        if isinstance(args[0], Crop):  # a box of a held tensor, in its tier (``held.py``)
            return args[0].read(out)
        # A copy: in-place ops of the tile (ReLU(inplace=True)) must not write into the whole tensor.
        return args[0][(slice(None), slice(None)) + out.slices()].clone()

    def flops(self, out, channels: int) -> int:
        return 0


rule(stage_source)(Source)


class Meets(Exception):
    """Raised inside ``split``: spatial node ``node`` uses ``whole``, a map of the whole image."""

    def __init__(self, node, whole, ctx) -> None:
        super().__init__(node, whole)
        self.node, self.whole, self.ctx = node, whole, ctx


def is_source(node) -> bool:
    return getattr(node, "target", None) is stage_source


def grid(value, like: torch.Tensor) -> bool:
    """Laid out (N, C, *spatial) as the input is, with more than one position."""
    return (
        isinstance(value, torch.Tensor)
        and value.ndim == like.ndim
        and value.shape[0] == like.shape[0]
        and any(n > 1 for n in value.shape[2:])
    )


def materialise(gm, values, x, meets: Meets, lookup):
    """``(gm, values, x, how many tensors it holds whole)``, a copy in which a later pass's tiles
    read ``meets.whole`` (or what it is computed from) box by box.

    Walks back from the whole-image map through untiled nodes that have a local rule on grid
    tensors (they run tiled instead), and puts a ``stage_source`` after each whole tensor at the
    edge of that walk. ``lookup(gm, values, node, roles)`` is the rule of ``node`` were ``roles``
    its inputs'."""
    graph, remap = fx.Graph(), {}
    graph.output(graph.graph_copy(gm.graph, remap))
    out = [next(n for n in g.nodes if n.op == "output") for g in (gm.graph, graph)]
    remap[out[0]] = out[1]
    values = {remap[n]: v for n, v in values.items() if n in remap}
    gm = fx.GraphModule(gm, graph, type(gm).__name__)
    gm.meta.update(meets.ctx.gm.meta)
    roles = {remap[n]: r for n, r in meets.ctx.roles.items() if n in remap}
    made = _materialise(gm, values, remap[x], remap[meets.node], remap[meets.whole], roles,
                        lambda node, r: lookup(gm, values, node, r))  # fmt: skip
    return gm, values, remap[x], made


def _materialise(gm, values, x, meeting, whole, roles, lookup) -> int:
    kinds, todo = {}, [whole]
    while todo:
        node = todo.pop()
        kind = None if node in kinds else tiled_kind(node, values, x, lookup, roles)
        if kind is not None:
            kinds[node] = kind
            todo += [i for i in node.all_input_nodes if roles.get(i) == "tail"]
    changed = True
    while changed:  # a tiled node's other untiled inputs: held whole, per channel, or tiled too;
        changed = False  # and its other users must have rules once it is spatial
        for node in list(kinds):
            inputs = [i for i in node.all_input_nodes if roles.get(i) == "tail" and i not in kinds]
            held = all(grid(values[i], values[x]) or _per_channel(values[i], values[x]) for i in inputs)
            if not held or not _users_have_rules(node, kinds, meeting, roles, lookup):
                del kinds[node]
                changed = True
    readers = set(kinds) | ({meeting} if meeting.op != "output" else set())
    edge = dict.fromkeys(
        i for n in readers for i in n.all_input_nodes
        if i not in kinds and roles.get(i) == "tail" and grid(values[i], values[x])
    )  # fmt: skip
    for whole in edge:
        with gm.graph.inserting_after(whole):
            source = gm.graph.call_function(stage_source, (whole,))
        source.meta.update(whole.meta)
        values[source] = values[whole]
        for user in [u for u in whole.users if u in readers]:
            user.replace_input_with(whole, source)
    gm.recompile()
    return len(edge)


def _users_have_rules(node, kinds, meeting, roles, lookup) -> bool:
    """Whether the untiled users of ``node`` that the walk did not reach have a rule (any kind) when
    ``node`` is spatial: one without would fail where it ran untiled before."""
    spatial = dict(roles) | dict.fromkeys(kinds, "spatial")
    for user in node.users:
        if user in kinds or user is meeting or user.op == "output":
            continue
        try:
            lookup(user, spatial)
        except Exception:  # a probe: a rule that refuses (or fails on) these inputs has none for them
            return False
    return True


def tiled_kind(node, values, x, lookup, roles) -> str | None:
    """``local`` or ``reduce`` if an untiled node could run tiled (as a local op or a streamed
    reduction) on its grid inputs held whole, else None. ``lookup(node, roles)``: its rule."""
    if roles.get(node) != "tail":
        return None
    inputs = [i for i in node.all_input_nodes if roles.get(i) == "tail" and grid(values[i], values[x])]
    if not inputs:
        return None
    roles = dict(roles)
    roles.update((i, "spatial") for i in inputs)
    try:
        kind = lookup(node, roles).kind
    except Exception:  # a probe: a rule that refuses (or fails on) these inputs has none for them
        return None
    if kind == "reduce" or (kind == "local" and grid(values[node], values[x])):
        return kind
    return None


def _per_channel(value, like) -> bool:
    """A value every position shares: not a tensor, or one of shape (N or 1, C, 1, ...)."""
    if not isinstance(value, torch.Tensor):
        return True
    return value.ndim == like.ndim and all(n == 1 for n in value.shape[2:])


# -- what a plan says about its stages ----------------------------------------------------------

GLOBAL_WORDS = ("attention", "softmax", "matmul", "bmm", "einsum", "norm", "linear", "interpolate", "pool")


def elements(value) -> int:
    """Elements a node's value holds (attention's scores are a value where the graph computes them
    with matmul and softmax; fused ``scaled_dot_product_attention`` does not materialise them)."""
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (tuple, list)):
        return sum(elements(v) for v in value)
    return 0


def sources(split) -> list:
    """The ``stage_source`` nodes of a split that read global stages' whole tensors (cuts apart)."""
    return [n for n in split.gm.graph.nodes if is_source(n) and n in split.shapes and not is_cut(n)]


def is_cut(source) -> bool:
    """Whether a ``stage_source`` reads a cut (``cuts.py``): a tiled node's value kept in a tier."""
    return is_hold(source.args[0])


def cut_sources(split) -> list:
    """The ``stage_source`` nodes of a split that read cuts."""
    return [n for n in split.gm.graph.nodes if is_source(n) and n in split.shapes and is_cut(n)]


def read_by_sources(derived) -> list:
    """The derived values of a pass that its tiles read only box by box (through ``stage_source``)."""
    return [d for d in derived if d.users and all(is_source(u) for u in d.users)]


def untiled(roles, source) -> list:
    """The untiled nodes that compute a stage's whole tensor, from the earlier passes' results on."""
    found, todo = {}, list(source.all_input_nodes)
    while todo:
        node = todo.pop()
        if node not in found and roles.get(node) == "tail":
            found[node] = True
            todo += node.all_input_nodes
    return list(found)


def maker(gm, roles, source):
    """The op that makes a stage: its first attention, softmax, product, norm... else its first node."""
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    nodes = sorted(untiled(roles, source), key=order.__getitem__)
    for word in GLOBAL_WORDS:  # in order of priority
        named = [n for n in nodes if word in _name(gm, n).lower()]
        if named:
            return named[0]
    return (nodes or [source])[0]


def reason(source, ctx) -> str:
    """Why a pass waits: the stage's whole tensor, and the op that made it."""
    whole = source.args[0]
    if is_hold(whole):
        cut = whole.args[0]
        return f"`{cut.name}` {tuple(ctx.shape(cut))} cut, kept in {whole.kwargs.get('tier', 'host')}"
    op = maker(ctx.gm, ctx.roles, source)
    made = f"{_name(ctx.gm, op)} `{op.name}`"
    return f"`{whole.name}` {tuple(ctx.shape(whole))} held whole (a global stage: {made})"


def held_elements(split) -> tuple[int, int]:
    """Elements of the stages' whole tensors, and of every value of the untiled subgraphs making them."""
    held = sum(math.prod(split.shapes[s]) for s in sources(split))
    nodes = {n for s in sources(split) for n in untiled(split.roles, s)}
    return held, sum(split.sizes.get(n, 0) for n in nodes)


def describe(split, item: int) -> str:
    """``print(plan)``'s line on the stages: each whole tensor, its size, and what made it."""
    rows = []
    for s in sources(split):
        op = maker(split.gm, split.roles, s)
        nbytes = math.prod(split.shapes[s]) * item
        rows.append(f"`{s.args[0].name}` {tuple(split.shapes[s])} ({size(nbytes)}) for pass "
                    f"{split.passes[s]}, made by {_name(split.gm, op)} `{op.name}`")  # fmt: skip
    held, values = held_elements(split)
    rows = rows[:3] + ([f"... ({len(rows) - 3} more)"] if len(rows) > 3 else [])
    return (f"{len(sources(split))} whole tensors, {size(held * item)}; the untiled subgraphs' values "
            f"{size(values * item)}: " + "; ".join(rows))  # fmt: skip


def _name(gm, node) -> str:
    return op_name(gm, node) if node.op in ("call_module", "call_function", "call_method") else node.op


def size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:.0f} B"


def crop_box(whole, need: dict):
    """The box of held tensor ``whole`` that one tile reads: the hull of its sources' boxes."""
    boxes = [need[u] for u in whole.users if u in need and not need[u].empty]
    if not boxes:
        return next(need[u] for u in whole.users if u in need)
    box = boxes[0]
    for b in boxes[1:]:
        box = box.hull(b)
    return box
