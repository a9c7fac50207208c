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
    count: int = 0  # moments: positions seen
    state: tuple = ()  # running sums of reductions that need more (softmax: sum of exponentials, ...)


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
        if self.how in ("sum", "mean"):
            part = values.sum(self.dims, keepdim=True)
            acc.value = part if acc.value is None else acc.value + part
            return
        best = self._best(values)
        if self.how == "first":
            flat = values.flatten(2).argmax(-1)  # first occurrence within the tile
            ties = self._image_index(flat, write).view_as(best)
        else:
            ties = (values == best).sum(self.dims, keepdim=True)
        if acc.value is None:
            acc.value, acc.ties = best, ties
            return
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


def _adaptive_to_one(node, ctx, how):
    if node.op == "call_module":
        m = ctx.module(node)
        size, indices = m.output_size, getattr(m, "return_indices", False)
    else:
        size = ctx.static(node.args[1] if len(node.args) > 1 else node.kwargs["output_size"])
        indices = ctx.static(node.kwargs.get("return_indices", False))
    sizes = size if isinstance(size, (tuple, list)) else (size,) * ctx.nd
    if indices or any(s != 1 for s in sizes):
        raise TilingError(
            f"{ctx.where(node)}: {ctx.op_name(node)} with output size {size} depends on the whole image "
            "size (a global op); only pooling to 1 (global pooling) is streamed over tiles."
        )
    return StreamedReduction(node, ctx, how)


@rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
      F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)  # fmt: skip
def adaptive_avg_pool(node, ctx):
    return _adaptive_to_one(node, ctx, "mean")


@rule(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
      F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)  # fmt: skip
def adaptive_max_pool(node, ctx):
    return _adaptive_to_one(node, ctx, "first")


class Boundary(Op):
    """Consumes a whole spatial tensor: the tiled part's output is assembled before it."""

    kind = "boundary"


@rule(nn.Flatten, torch.flatten, torch.reshape, torch.permute, torch.transpose,
      "flatten", "view", "reshape", "permute", "transpose", "unsqueeze", "squeeze")  # fmt: skip
def boundary(node, ctx):
    return Boundary(node, ctx)


_GLOBAL = (
    nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoderLayer,
    F.group_norm, F.layer_norm, F.instance_norm, F.scaled_dot_product_attention,
    torch.matmul, torch.bmm, torch.einsum, "matmul", "bmm",
)  # fmt: skip


@rule(*_GLOBAL)
def global_op(node, ctx):
    raise TilingError(
        f"{ctx.where(node)}: {ctx.op_name(node)} is a global op: each of its outputs depends on the whole "
        "image (statistics or attention over all positions), and it stands in the middle of the local "
        "part. GroupNorm and InstanceNorm become exact with `bp.tiled(model, ..., multipass=True)` (one "
        "more pass over the tiles per level of them); attention cannot be tiled exactly yet: place it "
        "after a global pooling."
    )


@rule(F.batch_norm)
def functional_batch_norm(node, ctx):
    training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
    if ctx.static(training):
        return global_op(node, ctx)
    from bigpicture.engine.rules import Pointwise

    return Pointwise(node, ctx)
