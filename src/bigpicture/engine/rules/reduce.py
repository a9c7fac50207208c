"""Where the tiled part ends: streamed reductions, boundary ops, and global ops.

A streamed reduction (global average/max pooling, mean/sum/amax over all spatial dimensions)
combines one partial result per tile, so the feature map before it is never whole. Its
backward needs, per tile, the weight each position gets from the reduced gradient: 1 for a
sum, and for a maximum the positions equal to it (split evenly, as ``amax`` does, or the
first in row-major order, as ``adaptive_max_pool`` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bigpicture.engine.box import Box
from bigpicture.engine.rules import Op, rule
from bigpicture.errors import TilingError


@dataclass
class Partial:
    """Running result of one streamed reduction over the tiles seen so far."""

    value: torch.Tensor | None = None  # (N, C, 1, ...): sum or maximum
    ties: torch.Tensor | None = None  # max: number of positions equal to it; first: their first index
    # (the log-normaliser of attention pooling, the image positions of top-k)
    count: int = 0  # moments: positions seen


class StreamedReduction(Op):
    kind = "reduce"

    def __init__(self, node, ctx, how: str | None = None):
        super().__init__(node, ctx)
        if how is None:
            target = node.target if isinstance(node.target, str) else node.target.__name__
            how = {"mean": "mean", "sum": "sum", "amax": "max", "amin": "min"}[target]
        self.how = how
        self.count = math.prod(self.in_extents[0])
        self.dims = tuple(range(2, 2 + self.nd))

    def _best(self, t):
        return t.amin(self.dims, keepdim=True) if self.how == "min" else t.amax(self.dims, keepdim=True)

    def accumulate(self, acc: Partial, values: torch.Tensor, write: Box) -> None:
        self.merge(acc, self.partial(values, write))

    def partial(self, values: torch.Tensor, write: Box) -> Partial:
        """The result of one tile's write box alone."""
        if self.how in ("sum", "mean"):
            return Partial(values.sum(self.dims, keepdim=True))
        best = self._best(values)
        if self.how == "first":
            flat = values.flatten(2).argmax(-1)  # first occurrence within the tile
            return Partial(best, self._image_index(flat, write).view_as(best))
        return Partial(best, (values == best).sum(self.dims, keepdim=True))

    def merge(self, acc: Partial, other: Partial) -> None:
        """Add ``other``'s result (of tiles after ``acc``'s, or of another rank's) into ``acc``."""
        if other.value is None:
            return
        if acc.value is None:
            acc.value, acc.ties, acc.count = other.value, other.ties, other.count
            return
        self.combine(acc, other)

    def combine(self, acc: Partial, other: Partial) -> None:
        """``merge`` of two results that both hold values."""
        if self.how in ("sum", "mean"):
            acc.value = acc.value + other.value
            return
        best, ties = other.value, other.ties
        better = best < acc.value if self.how == "min" else best > acc.value
        equal = best == acc.value
        if self.how == "first":
            acc.ties = torch.where(better, ties, torch.where(equal, torch.minimum(acc.ties, ties), acc.ties))
        else:
            acc.ties = torch.where(better, ties, acc.ties + torch.where(equal, ties, 0))
        acc.value = torch.where(better, best, acc.value)

    def _image_index(self, flat, write: Box):
        coords = torch.unravel_index(flat, write.shape)
        index = torch.zeros_like(flat)
        for c, lo, n in zip(coords, write.lo, self.in_extents[0]):
            index = index * n + c + lo
        return index

    def weights(self, acc: Partial, values: torch.Tensor, write: Box, grad: torch.Tensor):
        """d(result)/d(values) times the result's gradient, for one tile's write box."""
        if self.how in ("sum", "mean"):
            return grad.expand_as(values)
        if self.how == "first":
            return (self.image_index(values, write) == acc.ties) * grad
        return (values == acc.value) * (grad / acc.ties)

    def image_index(self, values: torch.Tensor, write: Box) -> torch.Tensor:
        """Row-major index in the whole image of each position of a tile's values: (1, 1, *write)."""
        index = torch.zeros((1, 1) + (1,) * self.nd, dtype=torch.int64, device=values.device)
        for d, (lo, n) in enumerate(zip(write.lo, self.in_extents[0])):
            shape = [1] * values.ndim
            shape[2 + d] = -1
            index = index * n + torch.arange(lo, lo + values.shape[2 + d], device=values.device).view(shape)
        return index

    def finalize(self, result, rest, kwargs):
        """The op's own output, from the combined partial result substituted for its input."""
        out = self.call((result,) + tuple(rest), kwargs)
        return out / self.count if self.how == "mean" else out


def _adaptive(node, ctx, how):
    """Pooling to 1 is a streamed reduction, and so is average pooling to any fixed size (a sum of
    fixed bins); max pooling to a larger size, or with indices, runs in the untiled tail."""
    if node.op == "call_module":
        m = ctx.module(node)
        size, indices = m.output_size, getattr(m, "return_indices", False)
    else:
        size = ctx.static(node.args[1] if len(node.args) > 1 else node.kwargs["output_size"])
        indices = ctx.static(node.kwargs.get("return_indices", node.args[2] if len(node.args) > 2 else False))
        indices = indices or node.target.__name__.endswith("_with_indices")
    sizes = size if isinstance(size, (tuple, list)) else (size,) * ctx.nd
    if not indices and all(s == 1 for s in sizes):
        return StreamedReduction(node, ctx, how)
    if how == "mean" and None not in sizes:
        return BinnedMean(node, ctx, sizes)
    return Boundary(node, ctx)


@rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
      F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)  # fmt: skip
def adaptive_avg_pool(node, ctx):
    return _adaptive(node, ctx, "mean")


@rule(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
      F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.adaptive_max_pool1d_with_indices,
      F.adaptive_max_pool2d_with_indices, F.adaptive_max_pool3d_with_indices)  # fmt: skip
def adaptive_max_pool(node, ctx):
    return _adaptive(node, ctx, "first")


class BinnedMean(StreamedReduction):
    """Adaptive average pooling to a fixed size: output bin i of dimension d averages input rows
    [floor(i n / s), ceil((i + 1) n / s)), a linear map ``W_d`` (s x n) per dimension. Each tile adds
    its write box times the columns of ``W_d`` it covers; the gradient of a tile is the output
    gradient times the same columns, transposed."""

    def __init__(self, node, ctx, sizes):
        super().__init__(node, ctx, how="bins")
        self.maps = [_bins(s, n) for s, n in zip(sizes, self.in_extents[0])]

    def _apply(self, t, write: Box, transpose: bool):
        for d, w in enumerate(self.maps):
            lo, hi = write.dim(d)
            w = w[:, lo:hi].to(t)
            t = torch.movedim(torch.movedim(t, 2 + d, -1) @ (w if transpose else w.T), -1, 2 + d)
        return t

    def accumulate(self, acc: Partial, values, write: Box) -> None:
        part = self._apply(values, write, transpose=False)
        acc.value = part if acc.value is None else acc.value + part

    def weights(self, acc: Partial, values, write: Box, grad):
        return self._apply(grad, write, transpose=True)

    def finalize(self, result, rest, kwargs):
        return result


def _bins(s: int, n: int) -> torch.Tensor:
    w = torch.zeros(s, n, dtype=torch.float64)
    for i in range(s):
        lo, hi = (i * n) // s, -((-(i + 1) * n) // s)
        w[i, lo:hi] = 1.0 / (hi - lo)
    return w


class Boundary(Op):
    """Consumes a whole spatial tensor: the tiled part's output is assembled before it."""

    kind = "boundary"


@rule(nn.Flatten, torch.flatten, torch.reshape, "flatten", "view", "reshape", "unsqueeze", "squeeze")
# (permute and transpose: channels.permute, pointwise where they keep every dimension in place)
def boundary(node, ctx):
    return Boundary(node, ctx)


rule(tuple)(boundary)  # namedtuples of outputs (``lookup`` sends their classes here): built untiled


_GLOBAL = (
    nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoderLayer,
    F.group_norm, F.layer_norm, F.instance_norm, F.scaled_dot_product_attention,
    torch.matmul, torch.bmm, "matmul", "bmm",
)  # fmt: skip


@rule(*_GLOBAL)
def global_op(node, ctx):
    if node.op == "call_module" and isinstance(ctx.module(node), nn.GroupNorm):  # not rewritten: one pass
        fix = ("multipass=False allows one pass over the tiles only; without it (the default) GroupNorm is "
               "exact with one more pass per level of such ops")  # fmt: skip
    else:
        fix = ("nn.GroupNorm and nn.InstanceNorm modules are exact by extra passes over the tiles (use them "
               "instead of the functional form); attention cannot be tiled exactly yet: place it after a "
               "global pooling")  # fmt: skip
    raise TilingError(
        f"{ctx.where(node)}: {ctx.op_name(node)} is a global op: each of its outputs depends on the whole "
        f"image (statistics or attention over all positions), and it stands in the middle of the local "
        f"part. {fix}."
    )


@rule(F.batch_norm)
def functional_batch_norm(node, ctx):
    training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
    if ctx.static(training):
        return global_op(node, ctx)
    from bigpicture.engine.rules import Pointwise

    return Pointwise(node, ctx)
