"""Normalisation with statistics over the whole image, made exact by an extra pass over the tiles.

GroupNorm, and InstanceNorm without running statistics, normalise each (sample, group) by
the mean and variance of all its positions. With ``multipass=True`` the graph is rewritten

    y = GroupNorm(a)   ->   s = moments(a, groups)       a streamed reduction (one pass)
                            y = normalize(a, s, ...)     pointwise, given s

so the statistics are combined over tiles (Chan's parallel update, numerically stable) and
the tiles after them run in a later pass. Their gradient flows through ``s`` exactly: per
position, d mean/da = 1/M and d var/da = 2 (a - mean) / M.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from bigpicture.engine.box import Box
from bigpicture.engine.rules import register_pointwise, rule
from bigpicture.engine.rules.reduce import Partial, StreamedReduction


def moments(a: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean and biased variance per (sample, group) over channels of the group and all positions."""
    flat = a.reshape(a.shape[0], groups, -1)
    var, mean = torch.var_mean(flat, dim=-1, correction=0)
    return torch.stack([mean, var], dim=-1)


def normalize(a, stats, weight, bias, eps: float, groups: int) -> torch.Tensor:
    n, c = a.shape[:2]
    spatial = (1,) * (a.ndim - 2)
    mean = stats[..., 0].reshape(n, groups, 1, *spatial)
    invstd = torch.rsqrt(stats[..., 1] + eps).reshape(n, groups, 1, *spatial)
    y = ((a.reshape(n, groups, c // groups, *a.shape[2:]) - mean) * invstd).reshape(a.shape)
    if weight is not None:
        y = y * weight.reshape(1, c, *spatial)
    if bias is not None:
        y = y + bias.reshape(1, c, *spatial)
    return y


register_pointwise(normalize)


@rule(moments)
class Moments(StreamedReduction):
    def __init__(self, node, ctx):
        super().__init__(node, ctx, how="moments")
        self.groups = ctx.static(node.args[1])

    def partial(self, values, write: Box) -> Partial:
        flat = values.reshape(values.shape[0], self.groups, -1)
        var, mean = torch.var_mean(flat, dim=-1, correction=0)
        return Partial(torch.stack([mean, var], dim=-1), var * flat.shape[-1], flat.shape[-1])

    def merge(self, acc: Partial, other: Partial) -> None:
        """Chan's parallel update of (count, mean, sum of squared deviations); ``ties`` holds the last."""
        if other.value is None:
            return
        if acc.value is None:
            acc.value, acc.ties, acc.count = other.value, other.ties, other.count
            return
        total = acc.count + other.count
        delta = other.value[..., 0] - acc.value[..., 0]
        mean = acc.value[..., 0] + delta * (other.count / total)
        acc.ties = acc.ties + other.ties + delta.square() * (acc.count * other.count / total)
        acc.count = total
        acc.value = torch.stack([mean, acc.ties / total], dim=-1)

    def weights(self, acc: Partial, values, write: Box, grad):
        n, c = values.shape[:2]
        spatial = (1,) * (values.ndim - 2)
        shape = (n, self.groups, 1, *spatial)
        mean, g_mean, g_var = (t.reshape(shape) for t in (acc.value[..., 0], grad[..., 0], grad[..., 1]))
        grouped = values.reshape(n, self.groups, c // self.groups, *values.shape[2:])
        w = g_mean / acc.count + g_var * 2 * (grouped - mean) / acc.count
        return w.reshape(values.shape)

    def finalize(self, result, rest, kwargs):
        return result


def rewrite_global_norms(gm: fx.GraphModule) -> int:
    """Replace GroupNorm and input-statistics InstanceNorm by moments + normalize; count them."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        groups = _groups(m)
        if groups is None:
            continue
        with gm.graph.inserting_before(node):
            stats = gm.graph.call_function(moments, (node.args[0], groups))
            weight = gm.graph.get_attr(f"{node.target}.weight") if m.weight is not None else None
            bias = gm.graph.get_attr(f"{node.target}.bias") if m.bias is not None else None
            new = gm.graph.call_function(normalize, (node.args[0], stats, weight, bias, m.eps, groups))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    gm.recompile()
    return count


def _groups(m: nn.Module) -> int | None:
    if isinstance(m, nn.GroupNorm):
        return m.num_groups
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and (m.training or not m.track_running_stats):
        return m.num_features
    return None
