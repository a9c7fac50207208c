"""Maps stacked on a new dimension and reduced over it at once: pointwise in space.

MONAI's RegUNet and LocalNet combine feature maps so::

    torch.mean(torch.stack(feature_list, dim=0), dim=0)              # (K, N, C, *S) -> (N, C, *S)
    torch.sum(torch.stack(x.split(c, dim=1), dim=-1), dim=-1)         # (N, C, *S, K) -> (N, C, *S)

The stacked tensor leaves the (N, C, *spatial) layout, so no rule can tile it on its own; the pair
is one pointwise op. At capture each reduction of a stack is rewritten into one call of
``reduce_stacked``, which computes exactly the same (it stacks and reduces, on the tile), and whose
rule checks, with this input's shapes, that the reduction is over the stacked dimension alone.
"""

from __future__ import annotations

import torch
from torch import fx

from bigpicture.engine.rules import Pointwise, _replaces, rule
from bigpicture.errors import TilingError

# reductions whose ``dim`` is their first argument after the tensor (methods of torch.Tensor too)
_REDUCTIONS = {
    "sum", "mean", "amax", "amin", "prod", "logsumexp", "max", "min", "nansum", "nanmean", "median",
    "nanmedian", "std", "var", "all", "any", "argmax", "argmin", "count_nonzero",
}  # fmt: skip


def reduce_stacked(tensors, stack_dim, reduction: str, /, *args, **kwargs):
    """``torch.stack(tensors, stack_dim).<reduction>(*args, **kwargs)``, one call for the tiles."""
    return getattr(torch.stack(tensors, stack_dim), reduction)(*args, **kwargs)


def fuse_stacked_reduction(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The ``reduce_stacked`` call that replaces ``node``, a reduction of a ``torch.stack``, or None."""
    name = _reduction_name(node)
    stack = node.args[0] if name and node.args else None
    if not (isinstance(stack, fx.Node) and stack.op == "call_function" and stack.target is torch.stack):
        return None
    tensors = stack.kwargs.get("tensors", stack.args[0] if stack.args else None)
    dim = stack.kwargs.get("dim", stack.args[1] if len(stack.args) > 1 else 0)
    if tensors is None or "out" in stack.kwargs:
        return None
    new = gm.graph.call_function(reduce_stacked, (tensors, dim, name, *node.args[1:]), dict(node.kwargs))
    _replaces(gm, node, new)
    return new


def _reduction_name(node: fx.Node) -> str | None:
    if node.op == "call_method" and node.target in _REDUCTIONS:
        return node.target
    name = getattr(node.target, "__name__", "")
    if node.op == "call_function" and name in _REDUCTIONS and getattr(torch, name, None) is node.target:
        return name
    return None


@rule(reduce_stacked)
def stacked_reduction(node, ctx):
    """Pointwise when the reduction is over the stacked dimension and nothing else."""
    stacked = ctx.ndim + 1
    dim = ctx.static(node.args[1]) % stacked
    given = ctx.static(node.kwargs.get("dim", node.args[3] if len(node.args) > 3 else None))
    dims = given if isinstance(given, (tuple, list)) else (given,)
    if given is None or {d % stacked for d in dims} != {dim}:
        reduction = node.args[2]
        raise TilingError(
            f"{ctx.where(node)}: torch.stack(..., dim={ctx.static(node.args[1])}) followed by {reduction} "
            f"over dim={given}: only a reduction over the stacked dimension alone gives back the (N, C, "
            f"*spatial) layout, each position from its own; reduce over dim={ctx.static(node.args[1])}."
        )
    return Pointwise(node, ctx)


@rule(torch.stack)
def stack(node, ctx):
    raise TilingError(
        f"{ctx.where(node)}: torch.stack puts the maps on a new dimension, out of the (N, C, *spatial) "
        "layout that bigpicture tiles. A stack reduced over its new dimension right away (e.g. "
        "`torch.stack(xs, 0).mean(0)`, or sum/amax/...) is tiled; otherwise concatenate along channels "
        "(`torch.cat(xs, 1)`), or stack after the tiled part."
    )
