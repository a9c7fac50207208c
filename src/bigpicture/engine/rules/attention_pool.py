"""Attention pooling, logsumexp and top-k over all positions, streamed over the tiles like a mean.

Attention pooling is a softmax over every position followed by a weighted sum of features:

    o[n, k, c] = sum_p exp(a[n, k, p] - M) h[n, c, p] / S,    S = sum_p exp(a[n, k, p] - M)

Each tile gives its own result and log-normaliser, o_t = sum exp(a - L_t) h over its positions
and L_t = log sum exp(a) (per sample and head); two results combine exactly, as flash attention
combines the blocks of a row (the online softmax: the running maximum, the sum of exponentials
and the weighted sum, kept as their quotient and logarithm):

    L = logaddexp(L_1, L_2)     o = o_1 e^(L_1 - L) + o_2 e^(L_2 - L)

so the feature map is never whole, and the tiles of several ranks, or of a run resumed from
its record, combine by the same merge as the tiles of one. The backward recomputes each tile
and weights it with the softmax under the global normaliser, p = exp(a - L):

    d o / d h[c, p] = p[k, p] g[k, c]        d o / d a[k, p] = p[k, p] (g[k] . (h[:, p] - o[k]))

Logsumexp keeps L alone; top-k keeps the k best values and their image positions. The graph
spellings that become these calls are found by ``positions.py``.
"""

from __future__ import annotations

import torch

from bigpicture.engine.box import Box
from bigpicture.engine.rules import rule
from bigpicture.engine.rules.pointwise import _spatial_dims
from bigpicture.engine.rules.reduce import Partial, StreamedReduction
from bigpicture.errors import TilingError


def channels(a: torch.Tensor) -> int:
    return a.shape[1]


def attention_pool(z: torch.Tensor, heads: int, layout: str, dims=None) -> torch.Tensor:
    """The softmax-weighted sum of ``z[:, heads:]`` with weights from the logits ``z[:, :heads]``,
    exactly as the spelling it replaces computes it (see ``positions.py``)."""
    a, h = z[:, :heads], z[:, heads:]
    weights = torch.softmax(a.flatten(2), -1)
    if layout == "sum":
        return (weights.view_as(a) * h).sum(dims)
    out = weights @ h.flatten(2).transpose(1, 2)
    return out if layout == "heads" else out.transpose(1, 2)


def logsumexp_positions(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x.flatten(2), -1)


def topk_positions(x: torch.Tensor, k: int, largest: bool = True):
    return torch.topk(x.flatten(2), k, -1, largest)


def _weight(norm, total):
    """The share ``e^(norm - total)`` of a part's result in the whole, against its (N, K, C) result."""
    return torch.exp(norm - total)[..., None]


def _like(scale, t):
    return scale.reshape(scale.shape + (1,) * (t.ndim - scale.ndim))


@rule(attention_pool)
class AttentionPool(StreamedReduction):
    def __init__(self, node, ctx):
        super().__init__(node, ctx, how="attention")
        self.heads, self.layout, dims = ctx.static(node.args[1:4])
        if self.layout == "sum" and (self.heads != 1 or _spatial_dims(dims, ctx.ndim) != set(self.dims)
                                     or len(set(d % ctx.ndim for d in dims)) != len(self.dims)):  # fmt: skip
            raise TilingError(
                f"{ctx.where(node)}: attention pooling written as `(softmax(a.flatten(2), -1).view_as(a) * h)"
                f".sum({dims})` is streamed for one attention channel summed over every spatial dimension "
                f"(here {self.heads} channels); write several heads as a matrix product, "
                "`softmax(a.flatten(2), -1) @ h.flatten(2).transpose(1, 2)`."
            )

    def _split(self, values):
        return values[:, : self.heads].flatten(2), values[:, self.heads :].flatten(2)

    def partial(self, values, write: Box) -> Partial:
        """(o, L): the tile's attention-weighted features under its own normaliser, and that normaliser."""
        a, h = self._split(values)
        norm = torch.logsumexp(a, -1)
        return Partial(torch.exp(a - norm[..., None]) @ h.transpose(1, 2), norm)

    def combine(self, acc: Partial, other: Partial) -> None:
        norm = torch.logaddexp(acc.ties, other.ties)
        acc.value = acc.value * _weight(acc.ties, norm) + other.value * _weight(other.ties, norm)
        acc.ties = norm

    def weights(self, acc: Partial, values, write: Box, grad):
        a, h = self._split(values)
        p = torch.exp(a - acc.ties[..., None])
        w_h = grad.transpose(1, 2) @ p
        w_a = p * (grad @ h - (grad * acc.value).sum(-1, keepdim=True))
        return torch.cat([w_a, w_h], 1).view_as(values)

    def finalize(self, result, rest, kwargs):
        return {"heads": result, "channels": result.transpose(1, 2), "sum": result[:, 0]}[self.layout]


@rule(logsumexp_positions, torch.logsumexp, "logsumexp")
class LogSumExp(StreamedReduction):
    def __init__(self, node, ctx):
        super().__init__(node, ctx, how="logsumexp")
        self.keepdim = False
        if node.target is not logsumexp_positions:
            dims = ctx.static(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None))
            self.keepdim = ctx.static(
                node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            )
            dims = dims if isinstance(dims, (tuple, list)) else (dims,)
            if sorted(d % ctx.ndim for d in dims) != list(self.dims):
                raise TilingError(
                    f"{ctx.where(node)}: logsumexp over dimensions {dims} of a spatial tensor; only over "
                    f"every spatial dimension {self.dims} (and nothing else) is streamed over tiles."
                )

    def partial(self, values, write: Box) -> Partial:
        return Partial(torch.logsumexp(values.flatten(2), -1))

    def combine(self, acc: Partial, other: Partial) -> None:
        acc.value = torch.logaddexp(acc.value, other.value)

    def weights(self, acc: Partial, values, write: Box, grad):
        return torch.exp(values - _like(acc.value, values)) * _like(grad, values)

    def finalize(self, result, rest, kwargs):
        return result.reshape(result.shape + (1,) * len(self.dims)) if self.keepdim else result


@rule(topk_positions)
class TopK(StreamedReduction):
    """The k largest (or smallest) values over all positions and their positions in the image.

    Among equal values, which positions are chosen is unspecified, as for ``torch.topk``."""

    def __init__(self, node, ctx):
        super().__init__(node, ctx, how="topk")
        self.k, self.largest = ctx.static(node.args[1:3])
        self.indices = None  # of the last call's result: finalize returns them with the values

    def partial(self, values, write: Box) -> Partial:
        flat = values.flatten(2)
        top, where = flat.topk(min(self.k, flat.shape[-1]), -1, self.largest)
        return Partial(top, self.image_index(values, write).flatten()[where])

    def combine(self, acc: Partial, other: Partial) -> None:
        top, index = torch.cat([acc.value, other.value], -1), torch.cat([acc.ties, other.ties], -1)
        acc.value, where = top.topk(min(self.k, top.shape[-1]), -1, self.largest)
        acc.ties = index.gather(-1, where)

    def merge(self, acc: Partial, other: Partial) -> None:
        super().merge(acc, other)
        self.indices = acc.ties

    def weights(self, acc: Partial, values, write: Box, grad):
        coords = torch.unravel_index(acc.ties, self.in_extents[0])
        inside = torch.ones_like(acc.ties, dtype=torch.bool)
        local = torch.zeros_like(acc.ties)
        for c, lo, hi in zip(coords, write.lo, write.hi):
            inside &= (c >= lo) & (c < hi)
            local = local * (hi - lo) + (c - lo).clamp(0, hi - lo - 1)
        w = torch.zeros_like(values).flatten(2)
        return w.scatter_add_(-1, local, grad * inside).view_as(values)

    def finalize(self, result, rest, kwargs):
        return torch.return_types.topk((result, self.indices))
