"""Ops over the non-spatial dimensions: each spatial position computed from the same position.

Repeating, expanding, narrowing, flipping or permuting channels (VNet repeats its input
channels; gates compare and select; embeddings are normalised or mixed by ``einsum`` over
channels) leaves every pixel where it was, so the op is pointwise in space. Each rule checks
that the dimensions it acts along are not spatial; where one is, it says so, since repeating,
reordering or reversing the image itself is no tile's business. A narrow along a spatial
dimension is a slice (see ``resample.Slice``).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from bigpicture.engine.rules import Op, Pointwise, register_pointwise, rule
from bigpicture.engine.rules.resample import Slice
from bigpicture.errors import TilingError

_COMPARE = (
    operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,
    operator.and_, operator.or_, operator.xor, operator.invert,
    torch.gt, torch.lt, torch.ge, torch.le, torch.eq, torch.ne, torch.greater, torch.less,
    torch.greater_equal, torch.less_equal, torch.not_equal, torch.logical_and, torch.logical_or,
    torch.logical_not, torch.logical_xor, torch.isnan, torch.isfinite, torch.sign, torch.zeros_like,
    torch.ones_like, torch.full_like, torch.masked_fill,
    nn.ChannelShuffle, F.channel_shuffle, torch.channel_shuffle,
    "gt", "lt", "ge", "le", "eq", "ne", "greater", "less", "logical_and", "logical_or", "logical_not",
    "masked_fill", "masked_fill_", "where", "sign", "bool", "long", "int", "type", "zero_",
)  # fmt: skip
register_pointwise(*_COMPARE)


def _arg(node, ctx, position: int, name: str, default=None):
    """A static argument of a call by position (a method's tensor counts) or by name."""
    args = node.args
    return ctx.static(node.kwargs.get(name, args[position] if len(args) > position else default))


def _sizes(node, ctx) -> tuple:
    """The size arguments of ``x.repeat(2, 1, ...)``, ``x.repeat((2, 1))``, ``torch.tile(x, dims)``."""
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(ctx.static(rest[0]), (tuple, list, torch.Size)):
        return tuple(ctx.static(rest[0]))
    return tuple(ctx.static(rest)) or tuple(ctx.static(next(iter(node.kwargs.values()), ())))


def _refuse(node, ctx, what: str, dims) -> TilingError:
    return TilingError(
        f"{ctx.where(node)}: {ctx.op_name(node)} {what} the spatial dimension(s) {sorted(dims)}; only "
        "channels (and the batch) can be repeated, reordered or reversed in the tiled part, since no tile "
        "sees the whole image. Do it on channels, or after the tiled part (e.g. after a global pooling)."
    )


def _spatial(dims, ctx) -> set[int]:
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return {d % ctx.ndim for d in dims} & set(range(2, ctx.ndim))


@rule(torch.tile, "repeat", "tile")
def repeat(node, ctx):
    """Repeats per dimension, right-aligned as torch aligns them; spatial ones must be 1."""
    sizes = _sizes(node, ctx)
    spatial = {ctx.ndim - 1 - k for k, s in enumerate(reversed(sizes)) if s != 1 and k < ctx.nd}
    if spatial:
        raise _refuse(node, ctx, "repeats", spatial)
    return Pointwise(node, ctx)


@rule(torch.repeat_interleave, "repeat_interleave")
def repeat_interleave(node, ctx):
    dim = _arg(node, ctx, 2, "dim")
    if dim is None:
        raise _refuse(node, ctx, "flattens (no dim=) and repeats", range(2, ctx.ndim))
    if _spatial(dim, ctx):
        raise _refuse(node, ctx, "repeats", _spatial(dim, ctx))
    return Pointwise(node, ctx)


@rule(torch.flip, "flip")
def flip(node, ctx):
    dims = _sizes(node, ctx)
    if _spatial(dims, ctx):
        raise _refuse(node, ctx, "reverses", _spatial(dims, ctx))
    return Pointwise(node, ctx)


@rule(torch.permute, torch.transpose, torch.swapaxes, torch.movedim, "permute", "transpose", "swapaxes",
      "movedim")  # fmt: skip
def permute(node, ctx):
    """Pointwise when batch, channels and every spatial dimension stay where they are (``x.permute(0, 1,
    2, 3)``, a swap of a dimension with itself); otherwise the tiled part ends here and the rest of
    the network runs untiled on the whole feature map (exact, e.g. channels-last heads)."""
    from bigpicture.engine.rules.reduce import Boundary

    fake = torch.empty((1,) * ctx.ndim).as_strided((1,) * ctx.ndim, tuple(range(1, ctx.ndim + 1)))
    moved = ctx.callable(node)((fake,) + tuple(ctx.static(node.args[1:])), ctx.static(node.kwargs))
    if moved.stride() == fake.stride():
        return Pointwise(node, ctx)
    return Boundary(node, ctx)


@rule(torch.narrow, "narrow")
def narrow(node, ctx):
    """Along channels: pointwise. Along a spatial dimension: the slice [start, start + length)."""
    dim, start, length = (_arg(node, ctx, k, name) for k, name in ((1, "dim"), (2, "start"), (3, "length")))
    dim %= ctx.ndim
    if dim < 2:
        return Pointwise(node, ctx)
    start %= ctx.shape(node.args[0])[dim]
    index = [slice(None)] * ctx.ndim
    index[dim] = slice(start, start + length)
    return Slice(node, ctx, tuple(index))


class Expand(Op):
    """``expand`` / ``broadcast_to`` over non-spatial dimensions. The sizes name the whole image's
    spatial extent; on a tile they become -1 (keep the tile's own extent)."""

    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        sizes = _sizes(node, ctx)
        shape = ctx.shape(node.args[0])
        if len(sizes) != ctx.ndim:
            raise TilingError(f"{ctx.where(node)}: {self.name} to {sizes} adds dimensions to the (N, C, "
                              "*spatial) layout, which bigpicture tiles only as it is.")  # fmt: skip
        wrong = {d for d in range(2, ctx.ndim) if sizes[d] not in (-1, shape[d])}
        if wrong:
            raise _refuse(node, ctx, "broadcasts", wrong)
        self.sizes = tuple(sizes[:2]) + (-1,) * ctx.nd

    def run(self, out, args, kwargs):
        x = self._crop(out)(args[0])
        return x.expand(*self.sizes)


rule(torch.broadcast_to, "expand")(Expand)
register_pointwise("expand_as")  # both operands are cropped to the tile


@rule(F.normalize, torch.norm, torch.linalg.vector_norm, torch.linalg.norm, "norm")
def norm(node, ctx):
    """Norms along channels only (``F.normalize``'s default dim=1)."""
    is_normalize = node.target is F.normalize
    dim = _arg(node, ctx, 2, "dim", 1 if is_normalize else None)
    dims = tuple(range(ctx.ndim)) if dim is None else dim
    if _spatial(dims, ctx):
        raise TilingError(
            f"{ctx.where(node)}: {ctx.op_name(node)} takes a norm over the spatial dimension(s) "
            f"{sorted(_spatial(dims, ctx))}, which depends on the whole image; only norms over channels "
            "(dim=1) can be tiled. Give dim=1, or move it after the tiled part."
        )
    return Pointwise(node, ctx)


@rule(torch.einsum)
def einsum(node, ctx):
    """Pointwise when every spatial index of each spatial operand goes to the output at its own place
    and no other operand carries it: contractions and products over channels and batch only."""
    equation = ctx.static(node.args[0]).replace(" ", "")
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):  # einsum(eq, [a, b])
        operands = operands[0]
    ins, out = _subscripts(equation, [len(ctx.shape(o)) for o in operands])
    spatial = [k for k, o in enumerate(operands) if o in ctx.spatial_inputs(node)]
    letters = {ins[k][d] for k in spatial for d in range(2, len(ins[k]))}
    for k, sub in enumerate(ins):
        for d, letter in enumerate(sub):
            in_place = k in spatial and d >= 2 and len(out) == ctx.ndim and out[d] == letter
            if letter in letters and not in_place:
                raise TilingError(
                    f"{ctx.where(node)}: einsum {equation!r} moves, contracts or broadcasts a spatial "
                    f"index ({letter!r} of operand {k}); only products and sums over channels and the batch "
                    "can be tiled, with every spatial index kept in place in the output."
                )
    return Pointwise(node, ctx)


def _subscripts(equation: str, ndims: list[int]) -> tuple[list[str], str]:
    """The operands' and the output's subscripts, with ``...`` spelled out (right-aligned, in capitals)."""
    lhs, arrow, rhs = equation.partition("->")
    ins = lhs.split(",")
    pool = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    longest = 0

    def expand(sub: str, n: int) -> str:
        nonlocal longest
        if "..." not in sub:
            return sub
        k = n - (len(sub) - 3)
        longest = max(longest, k)
        return sub.replace("...", pool[26 - k :] if k else "")

    ins = [expand(s, n) for s, n in zip(ins, ndims)]
    if not arrow:  # implicit output: the broadcast dimensions, then the letters used once, sorted
        letters = "".join(ins)
        once = sorted(c for c in set(letters) if c.islower() and letters.count(c) == 1)
        rhs = pool[26 - longest :] + "".join(once)
    else:
        rhs = rhs.replace("...", pool[26 - longest :] if longest else "")
    return ins, rhs
