"""Pixel (un)shuffle in any number of spatial dimensions, and the view/permute/reshape chains
that spell it out.

A 3D pixel shuffle is usually written by hand (MONAI's ``pixelshuffle`` does it so)::

    y = x.reshape(n, c, r, r, r, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(n, c, d*r, h*r, w*r)

The middle of such a chain leaves the (N, C, *spatial) layout, so no rule can see it one op at a
time. ``fold`` replaces each such chain by one call of ``pixel_shuffle_nd`` (or
``pixel_unshuffle_nd``) after checking, on the fake tensors of this input shape, that the
permuted view has the shape and strides of the canonical op's: views of a contiguous tensor
with equal shapes and strides put every element in the same place. The check holds for this
shape only, so the fold rewrites a copy of the graph, used by this shape's split alone.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import fx, nn

from bigpicture.engine.box import Box
from bigpicture.engine.padding import read
from bigpicture.engine.rules import Op, rule
from bigpicture.errors import TilingError


def pixel_shuffle_nd(x: torch.Tensor, r: tuple[int, ...]) -> torch.Tensor:
    """(N, C*prod(r), *S) -> (N, C, *S*r); ``F.pixel_shuffle`` in 2D, the same layout in any."""
    y = _shuffle_view(x, r)
    return y.reshape(*y.shape[:2], *(a * b for a, b in zip(x.shape[2:], r)))


def pixel_unshuffle_nd(x: torch.Tensor, r: tuple[int, ...]) -> torch.Tensor:
    """(N, C, *S*r) -> (N, C*prod(r), *S): the inverse of ``pixel_shuffle_nd``."""
    y = _unshuffle_view(x, r)
    return y.reshape(x.shape[0], x.shape[1] * math.prod(r), *y.shape[2 + len(r) :])


def _shuffle_view(x, r):
    """(N, C, *S, *r) as a view of x, before the last reshape merges each (S_d, r_d)."""
    n, cr, *s = x.shape
    k = len(s)
    order = [0, 1] + [i for d in range(k) for i in (2 + k + d, 2 + d)]
    return x.reshape(n, cr // math.prod(r), *r, *s).permute(order)


def _unshuffle_view(x, r):
    """(N, C, *r, *S) as a view of x, before the last reshape merges C and r."""
    n, c, *t = x.shape
    k = len(t)
    order = [0, 1] + [2 + 2 * d + 1 for d in range(k)] + [2 + 2 * d for d in range(k)]
    return x.reshape(n, c, *(v for d in range(k) for v in (t[d] // r[d], r[d]))).permute(order)


_VIEWS = {pixel_shuffle_nd: _shuffle_view, pixel_unshuffle_nd: _unshuffle_view}


class PixelShuffle(Op):
    """Output row i of dimension d is row i // r_d of the input (its channel chosen by i % r_d)."""

    def __init__(self, node, ctx, factors):
        super().__init__(node, ctx)
        self.r = tuple(factors)

    @property
    def stride(self):
        return tuple(Fraction(1, r) for r in self.r)

    def needs(self, out):
        return [
            Box(
                tuple(a // r for a, r in zip(out.lo, self.r)),
                tuple((b - 1) // r + 1 for b, r in zip(out.hi, self.r)),
            )
        ]

    def run(self, out, args, kwargs):
        box = self.needs(out)[0]
        y = pixel_shuffle_nd(read(args[0], box, self.in_extents[0]), self.r)
        return y[(..., *out.relative_to(Box(tuple(a * r for a, r in zip(box.lo, self.r)), out.hi)).slices())]


class PixelUnshuffle(PixelShuffle):
    @property
    def stride(self):
        return tuple(Fraction(r) for r in self.r)

    def needs(self, out):
        return [
            Box(tuple(a * r for a, r in zip(out.lo, self.r)), tuple(b * r for b, r in zip(out.hi, self.r)))
        ]

    def run(self, out, args, kwargs):
        return pixel_unshuffle_nd(read(args[0], self.needs(out)[0], self.in_extents[0]), self.r)


def _torch_factor(node, ctx):
    """torch's own pixel (un)shuffle: 2D only (of a volume it moves depth into channels)."""
    if ctx.nd != 2:
        raise TilingError(
            f"{ctx.where(node)}: {ctx.op_name(node)} on a {ctx.nd}D image: torch's pixel (un)shuffle moves "
            "pixels of the last two dimensions only (of a volume it would mix depth into channels), so "
            "bigpicture tiles it on 2D images only. Use it on 2D images, or after the tiled part."
        )
    if node.op == "call_module":
        m = ctx.module(node)
        r = getattr(m, "upscale_factor", None) or m.downscale_factor
    else:
        r = ctx.static(node.args[1] if len(node.args) > 1 else next(iter(node.kwargs.values())))
    return (r, r)


@rule(nn.PixelShuffle, F.pixel_shuffle)
def pixel_shuffle(node, ctx):
    return PixelShuffle(node, ctx, _torch_factor(node, ctx))


@rule(nn.PixelUnshuffle, F.pixel_unshuffle)
def pixel_unshuffle(node, ctx):
    return PixelUnshuffle(node, ctx, _torch_factor(node, ctx))


@rule(pixel_shuffle_nd)
def shuffle_nd(node, ctx):
    return PixelShuffle(node, ctx, ctx.static(node.args[1]))


@rule(pixel_unshuffle_nd)
def unshuffle_nd(node, ctx):
    return PixelUnshuffle(node, ctx, ctx.static(node.args[1]))


# -- chains of view, permute and reshape -------------------------------------------------------

_RESHAPES = ("reshape", "view", torch.reshape)
_PERMUTES = ("permute", torch.permute)


def fold(gm: fx.GraphModule, values: dict, x: fx.Node):
    """``(gm, values, x)`` with every pixel shuffle chain replaced by one call; unchanged if none."""
    chains = [c for c in (_chain(node, values) for node in gm.graph.nodes) if c is not None]
    if not chains:
        return gm, values, x
    graph, remap = fx.Graph(), {}
    graph.output(graph.graph_copy(gm.graph, remap))
    new = {remap[n]: v for n, v in values.items() if n in remap}
    old_output = next(n for n in gm.graph.nodes if n.op == "output")
    new[next(n for n in graph.nodes if n.op == "output")] = values[old_output]
    for nodes, fn, r in chains:
        first, *middle, last = [remap[n] for n in nodes]
        with graph.inserting_before(last):
            call = graph.call_function(fn, (first.args[0], r))
        last.replace_all_uses_with(call)
        new[call] = new[last]
        for node in [last, *reversed(middle), first]:
            graph.erase_node(node)
            del new[node]
    folded = fx.GraphModule(gm, graph, type(gm).__name__)
    folded.meta.update(gm.meta)
    return folded, new, remap[x]


def _chain(node, values):
    """(the chain's nodes, the op, its factors) if ``node`` starts a pixel (un)shuffle chain."""
    if _target(node) not in _RESHAPES or not isinstance(values.get(node.args[0]), torch.Tensor):
        return None
    nodes = [node]
    while len(nodes) < 4 and len(nodes[-1].users) == 1:
        user = next(iter(nodes[-1].users))
        nodes.append(user)
        if _target(user) in _RESHAPES and len(nodes) > 2:
            break
    targets = [_target(n) for n in nodes]
    if len(nodes) < 3 or targets[1] not in _PERMUTES or targets[-1] not in _RESHAPES:
        return None
    if len(nodes) == 4 and targets[2] != "contiguous":
        return None
    a, permuted, b = values[node.args[0]], values[nodes[1]], values[nodes[-1]]
    if not isinstance(b, torch.Tensor) or b.ndim != a.ndim or a.ndim < 3 or not a.is_contiguous():
        return None
    for fn, small, big in ((pixel_shuffle_nd, a, b), (pixel_unshuffle_nd, b, a)):
        if small.shape[0] != big.shape[0] or any(q % p for p, q in zip(small.shape[2:], big.shape[2:])):
            continue
        r = tuple(q // p for p, q in zip(small.shape[2:], big.shape[2:]))
        if math.prod(r) > 1 and _same_view(fn, a, r, permuted, b):
            return nodes, fn, r
    return None


def _same_view(fn, a, r, permuted, b) -> bool:
    """Whether the chain's permuted view of ``a`` is the canonical op's, element for element."""
    x = torch.empty(a.shape, device="meta")
    try:
        canonical, view = fn(x, r), _VIEWS[fn](x, r)
    except RuntimeError:
        return False
    return canonical.shape == b.shape and view.shape == permuted.shape and view.stride() == permuted.stride()


def _target(node):
    return node.target if node.op in ("call_method", "call_function") else None
