"""Attention pooling, logsumexp and top-k over all positions, streamed over the tiles like a mean.

Attention pooling is a softmax over every position followed by a weighted sum of features:

    o[n, k, c] = sum_p exp(a[n, k, p] - M) h[n, c, p] / S,    S = sum_p exp(a[n, k, p] - M)

Per tile the engine keeps a running maximum M, the sum of exponentials S and the weighted sum
V; a new tile with its own (m, s, v) combines exactly (the online softmax):

    M' = max(M, m)    S' = S e^(M - M') + s e^(m - M')    V' = V e^(M - M') + v e^(m - M')

so the feature map is never whole. The backward recomputes each tile and weights it with the
softmax under the global normaliser, p = exp(a - M) / S:

    d o / d h[c, p] = p[k, p] g[k, c]        d o / d a[k, p] = p[k, p] (g[k] . (h[:, p] - o[k]))

Logsumexp keeps (M, S); top-k keeps the k best values and their image positions. The graph
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


def _rescale(acc: Partial, m: torch.Tensor, *sums: torch.Tensor) -> tuple:
    """Running sums with maximum ``acc.ties`` and new ones with maximum ``m``, on a common maximum."""
    if acc.value is None:
        acc.ties = m
        return sums
    new = torch.maximum(acc.ties, m)
    old, now = torch.exp(acc.ties - new), torch.exp(m - new)
    acc.ties = new
    return tuple(s * _like(old, s) + t * _like(now, t) for s, t in zip(acc.state, sums))


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

    def accumulate(self, acc: Partial, values, write: Box) -> None:
        a, h = self._split(values)
        m = a.amax(-1)
        e = torch.exp(a - m[..., None])
        acc.state = _rescale(acc, m, e.sum(-1), e @ h.transpose(1, 2))
        acc.value = acc.state[1] / acc.state[0][..., None]

    def weights(self, acc: Partial, values, write: Box, grad):
        a, h = self._split(values)
        p = torch.exp(a - acc.ties[..., None]) / acc.state[0][..., None]
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

    def accumulate(self, acc: Partial, values, write: Box) -> None:
        flat = values.flatten(2)
        m = flat.amax(-1)
        acc.state = _rescale(acc, m, torch.exp(flat - m[..., None]).sum(-1))
        acc.value = acc.ties + torch.log(acc.state[0])

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

    def accumulate(self, acc: Partial, values, write: Box) -> None:
        flat = values.flatten(2)
        top, where = flat.topk(min(self.k, flat.shape[-1]), -1, self.largest)
        index = self.image_index(values, write).flatten()[where]
        if acc.value is not None:
            top, index = torch.cat([acc.value, top], -1), torch.cat([acc.ties, index], -1)
            top, where = top.topk(min(self.k, top.shape[-1]), -1, self.largest)
            index = index.gather(-1, where)
        acc.value, acc.ties = top, index
        self.indices = index

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
