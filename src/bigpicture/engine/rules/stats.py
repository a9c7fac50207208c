"""Normalisation with statistics over the whole image, made exact by an extra pass over the tiles.

GroupNorm, InstanceNorm without running statistics, and BatchNorm in training mode normalise
by the mean and variance of all positions of a (sample, group), or, for BatchNorm, of a channel
over the whole batch. With ``multipass=True`` the graph is rewritten

    y = GroupNorm(a)   ->   s = moments(a, groups)       a streamed reduction (one pass)
                            y = normalize(a, s, ...)     pointwise, given s
    y = BatchNorm(a)   ->   s = batch_moments(a)         per channel, over batch and positions
                            track_running_stats(s, ...)  the buffers, once per forward
                            y = batch_normalize(a, s, ...)

so the statistics are combined over tiles (Chan's parallel update, numerically stable; the
way SyncBatchNorm combines them over devices) and the tiles after them run in a later pass.
Their gradient flows through ``s`` exactly: per position, d mean/da = 1/M and
d var/da = 2 (a - mean) / M, with the summed gradients of ``s`` from the later pass's tiles;
that is BatchNorm's backward (its sums of the gradient and of the gradient times the
normalised input), taken over the tiles. Each level of such norms costs one more pass.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import is_fake

from bigpicture.engine.box import Box
from bigpicture.engine.rules import register_pointwise, rule
from bigpicture.engine.rules.reduce import Partial, StreamedReduction


def moments(a: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean and biased variance per (sample, group) over channels of the group and all positions."""
    var, mean = torch.var_mean(a.reshape(a.shape[0], groups, -1), dim=-1, correction=0)
    return torch.stack([mean, var], dim=-1)


def batch_moments(a: torch.Tensor) -> torch.Tensor:
    """Mean and biased variance per channel over the batch and all positions: (C, 2)."""
    var, mean = torch.var_mean(a.transpose(0, 1).reshape(a.shape[1], -1), dim=-1, correction=0)
    return torch.stack([mean, var], dim=-1)


def normalize(a, stats, weight, bias, eps: float, groups: int) -> torch.Tensor:
    channels = a.shape[1]
    mean, var = (stats[..., i].repeat_interleave(channels // groups, dim=1) for i in (0, 1))  # (N, C)
    return _scaled(a, mean, var, weight, bias, eps)


def batch_normalize(a, stats, weight, bias, eps: float) -> torch.Tensor:
    return _scaled(a, stats[:, 0], stats[:, 1], weight, bias, eps)


def _scaled(a, mean, var, weight, bias, eps: float) -> torch.Tensor:
    """``(a - mean) / sqrt(var + eps) * weight + bias`` as ``a * scale + shift``, with per-channel
    ``scale`` and ``shift`` (as torch's CPU BatchNorm computes it): one op on the tile, whose
    backward keeps ``a`` alone, as BatchNorm's does, where the spelt-out form keeps two more
    tile-sized tensors (``a - mean`` and the normalised ``a``) for every norm of the network."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    shape = (-1, a.shape[1]) + (1,) * (a.ndim - 2)  # from (C,) or (N, C)
    return torch.addcmul(shift.reshape(shape), a, scale.reshape(shape))


register_pointwise(normalize, batch_normalize)


def positions_per_channel(a: torch.Tensor) -> int:
    return a.numel() // a.shape[1]


def instance_running_stats(stats, running_mean, running_var, momentum, count: int):
    """InstanceNorm's buffer update with input statistics: each sample's (C, 2) statistics update
    the buffers as BatchNorm's would, then they are averaged over the batch (as ATen does)."""
    return track_running_stats(stats.mean(0), running_mean, running_var, None, momentum, count)


def positions_per_instance(a: torch.Tensor) -> int:
    return a[0, 0].numel()


def track_running_stats(stats, running_mean, running_var, num_batches_tracked, momentum, count: int):
    """BatchNorm's buffer update in training, as ``_BatchNorm.forward`` does it: once per forward.

    The running variance takes the unbiased variance; ``momentum=None`` is a cumulative average.
    Returns ``stats`` (a tensor, so the node runs after the pass that computes them). Shape
    propagation on fake tensors leaves the buffers alone.
    """
    if is_fake(stats):
        return stats
    with torch.no_grad():
        factor = momentum
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
        running_mean.mul_(1 - factor).add_(stats[:, 0].to(running_mean.dtype), alpha=factor)
        unbiased = stats[:, 1] * (count / max(count - 1, 1))
        running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
    return stats


@rule(moments, batch_moments)
class Moments(StreamedReduction):
    def __init__(self, node, ctx):
        super().__init__(node, ctx, how="moments")
        self.groups = ctx.static(node.args[1]) if node.target is moments else None

    def _rows(self, values):
        """The values as (..., M): one row per statistic."""
        if self.groups is None:
            return values.transpose(0, 1).reshape(values.shape[1], -1)
        return values.reshape(values.shape[0], self.groups, -1)

    def _spread(self, t, values):
        """A per-row statistic, broadcast against ``values``."""
        n, c = values.shape[:2]
        spatial = (1,) * (values.ndim - 2)
        if self.groups is None:
            return t.reshape(1, c, *spatial)
        return t.repeat_interleave(c // self.groups, dim=1).reshape(n, c, *spatial)

    def partial(self, values, write: Box) -> Partial:
        flat = self._rows(values)
        var, mean = torch.var_mean(flat, dim=-1, correction=0)
        return Partial(torch.stack([mean, var], dim=-1), var * flat.shape[-1], flat.shape[-1])

    def combine(self, acc: Partial, other: Partial) -> None:
        """Chan's parallel update of (count, mean, sum of squared deviations); ``ties`` holds the last."""
        total = acc.count + other.count
        delta = other.value[..., 0] - acc.value[..., 0]
        mean = acc.value[..., 0] + delta * (other.count / total)
        acc.ties = acc.ties + other.ties + delta.square() * (acc.count * other.count / total)
        acc.count = total
        acc.value = torch.stack([mean, acc.ties / total], dim=-1)

    def weights(self, acc: Partial, values, write: Box, grad):
        stats = (acc.value[..., 0], grad[..., 0], grad[..., 1])
        mean, g_mean, g_var = (self._spread(t, values) for t in stats)
        slope = g_var * (2 / acc.count)  # g_mean / M + g_var 2 (a - mean) / M, with one tile-sized op
        return torch.addcmul(g_mean / acc.count - mean * slope, values, slope)

    def finalize(self, result, rest, kwargs):
        return result


def rewrite_global_norms(gm: fx.GraphModule) -> int:
    """Replace GroupNorm, input-statistics InstanceNorm and batch-statistics BatchNorm by their
    statistics and a pointwise normalisation; count them."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        with gm.graph.inserting_before(node):
            new = _batch_norm(gm, node, m) if _batch_statistics(m) else _group_norm(gm, node, m)
        if new is None:
            continue
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    gm.recompile()
    return count


def _group_norm(gm, node, m) -> fx.Node | None:
    groups = _groups(m)
    if groups is None:
        return None
    stats = gm.graph.call_function(moments, (node.args[0], groups))
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.training and m.track_running_stats:
        buffers = [_attr(gm, node, m, b) for b in ("running_mean", "running_var")]
        count = gm.graph.call_function(positions_per_instance, (node.args[0],))
        momentum = 0.0 if m.momentum is None else m.momentum  # as _InstanceNorm.forward passes it
        gm.graph.call_function(instance_running_stats, (stats, *buffers, momentum, count))
    weight, bias = _attr(gm, node, m, "weight"), _attr(gm, node, m, "bias")
    return gm.graph.call_function(normalize, (node.args[0], stats, weight, bias, m.eps, groups))


def _batch_norm(gm, node, m) -> fx.Node:
    a, graph = node.args[0], gm.graph
    stats = graph.call_function(batch_moments, (a,))
    if m.training and m.track_running_stats:
        buffers = [_attr(gm, node, m, b) for b in ("running_mean", "running_var", "num_batches_tracked")]
        count = graph.call_function(positions_per_channel, (a,))
        graph.call_function(track_running_stats, (stats, *buffers, m.momentum, count))
    weight, bias = _attr(gm, node, m, "weight"), _attr(gm, node, m, "bias")
    return graph.call_function(batch_normalize, (a, stats, weight, bias, m.eps))


def _attr(gm, node, m, name: str) -> fx.Node | None:
    return gm.graph.get_attr(f"{node.target}.{name}") if getattr(m, name, None) is not None else None


def _batch_statistics(m: nn.Module) -> bool:
    """Whether a BatchNorm normalises with the batch's statistics (training, or no running ones)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)


def _groups(m: nn.Module) -> int | None:
    if isinstance(m, nn.GroupNorm):
        return m.num_groups
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and (m.training or not m.track_running_stats):
        return m.num_features
    return None
