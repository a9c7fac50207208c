"""Reductions over all positions written on the flattened map, found in the graph and fused.

Attention pooling (gated attention MIL, Ilse et al. 2018), logsumexp and top-k over positions
are written on ``x.flatten(2)``, a (N, C, P) view of every position, which on its own would
make the whole feature map a boundary tensor. These spellings are rewritten, at capture, into
one call each that computes exactly the same thing and that ``attention_pool.py`` streams over
the tiles:

    softmax(a.flatten(2), -1) @ h.flatten(2).transpose(1, 2)      -> attention_pool(cat(a, h), K, "heads")
    h.flatten(2) @ softmax(a.flatten(2), -1).transpose(1, 2)      -> attention_pool(cat(a, h), K, "channels")
    (softmax(a.flatten(2), -1).view_as(a) * h).sum(dims)          -> attention_pool(cat(a, h), K, "sum", dims)
    torch.logsumexp(x.flatten(2), -1)                             -> logsumexp_positions(x)
    torch.topk(x.flatten(2), k, -1)                               -> topk_positions(x, k, largest)

``a`` holds K attention logits per position and ``h`` the features; they are concatenated along
channels so that one tile value carries both. The softmax itself stays in the graph if anything
else uses it (an attention map for display: K channels, small).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from bigpicture.engine.rules.attention_pool import (
    attention_pool,
    channels,
    logsumexp_positions,
    topk_positions,
)
from bigpicture.engine.rules.norms import fuse_functional_norm
from bigpicture.engine.rules.stacked import fuse_stacked_reduction

_FLATTEN = {torch.flatten, "flatten"}
_SOFTMAX = {F.softmax, torch.softmax, "softmax"}
_TRANSPOSE = {torch.transpose, "transpose"}
_PERMUTE = {torch.permute, "permute"}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
_VIEW_AS = {"view_as", "reshape_as"}
_MUL = {operator.mul, torch.mul, "mul"}
_SUM = {torch.sum, "sum"}
_LOGSUMEXP = {torch.logsumexp, "logsumexp"}
_TOPK = {torch.topk, "topk"}
_LAST = (-1, 2, (-1,), (2,), [-1], [2])  # the positions axis of a (N, C, P) tensor


def _is(node, targets) -> bool:
    return (
        isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets
    )


def _param(node, i: int, name: str, default):
    """Argument ``i`` (counting the tensor as 0, for functions and methods alike), or by name."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _flattened(node):
    """``x`` where ``node`` is ``x.flatten(2)``: every position along the last axis."""
    if _is(node, _FLATTEN) and _param(node, 1, "start_dim", 0) == 2 and _param(node, 2, "end_dim", -1) == -1:
        return node.args[0]
    return None


def _softmax_over_positions(gm, node):
    """``a`` where ``node`` is the softmax of ``a.flatten(2)`` over positions."""
    if _is(node, _SOFTMAX) and _param(node, 1, "dim", None) in _LAST and node.kwargs.get("dtype") is None:
        return _flattened(node.args[0])
    if isinstance(node, fx.Node) and node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m) is nn.Softmax and m.dim in _LAST:
            return _flattened(node.args[0])
    return None


def _transposed(node):
    """``y`` where ``node`` swaps the last two axes of a 3-d ``y``."""
    if _is(node, _TRANSPOSE) and {_param(node, 1, "dim0", 0), _param(node, 2, "dim1", 1)} in (
        {1, 2},
        {-1, -2},
    ):
        return node.args[0]
    if _is(node, _PERMUTE):
        dims = node.args[1] if len(node.args) == 2 else node.args[1:]
        if tuple(dims) == (0, 2, 1):
            return node.args[0]
    return None


def _attention_matmul(gm, node):
    """(a, h, layout) of a softmax-weighted sum written as a matrix product."""
    if not _is(node, _MATMUL):
        return None
    left, right = node.args[:2]
    a, h = _softmax_over_positions(gm, left), _flattened(_transposed(right))
    if a is not None and h is not None:
        return a, h, "heads", None
    h, a = _flattened(left), _softmax_over_positions(gm, _transposed(right))
    if a is not None and h is not None:
        return a, h, "channels", None
    return None


def _attention_sum(gm, node):
    """(a, h, "sum", dims) of ``(softmax(a.flatten(2), -1).view_as(a) * h).sum(dims)``."""
    if not _is(node, _SUM) or node.kwargs.get("keepdim") or len(node.args) > 2 or node.kwargs.get("dtype"):
        return None
    product, dims = node.args[0], _param(node, 1, "dim", None)
    if not _is(product, _MUL) or dims is None:
        return None
    for weights, h in (product.args[:2], product.args[1::-1]):
        if _is(weights, _VIEW_AS):
            a = _softmax_over_positions(gm, weights.args[0])
            if a is not None and a is weights.args[1] and isinstance(h, fx.Node):
                return a, h, "sum", tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    return None


def _fuse_attention(gm, node) -> fx.Node | None:
    found = _attention_matmul(gm, node) or _attention_sum(gm, node)
    if found is None:
        return None
    a, h, layout, dims = found
    graph = gm.graph
    z = graph.call_function(torch.cat, ([a, h], 1))
    heads = graph.call_function(channels, (a,))
    return graph.call_function(attention_pool, (z, heads, layout, dims))


def _fuse_logsumexp(gm, node) -> fx.Node | None:
    if (
        _is(node, _LOGSUMEXP)
        and _param(node, 1, "dim", None) in _LAST
        and not _param(node, 2, "keepdim", False)
    ):
        x = _flattened(node.args[0])
        return None if x is None else gm.graph.call_function(logsumexp_positions, (x,))
    return None


def _fuse_topk(gm, node) -> fx.Node | None:
    if (
        _is(node, _TOPK)
        and _param(node, 2, "dim", -1) in _LAST
        and isinstance(_param(node, 1, "k", None), int)
    ):
        x = _flattened(node.args[0])
        largest = _param(node, 3, "largest", True)
        if x is not None and isinstance(largest, bool):
            return gm.graph.call_function(topk_positions, (x, _param(node, 1, "k", None), largest))
    return None


_FUSIONS = (_fuse_attention, _fuse_logsumexp, _fuse_topk, fuse_stacked_reduction, fuse_functional_norm)


def rewrite_position_reductions(gm: fx.GraphModule) -> int:
    """Fuse the spellings above into calls the engine streams, reductions of stacked maps
    (``stacked.py``) into one pointwise call each, and functional norms into their statistics and
    normalisation (``norms.py``); count them."""
    count = 0
    for node in list(gm.graph.nodes):
        for fuse in _FUSIONS:
            with gm.graph.inserting_before(node):
                new = fuse(gm, node)
            if new is not None:
                node.replace_all_uses_with(new)
                _erase_unused(gm.graph, node)
                count += 1
                break
    if count:
        gm.recompile()
    return count


def _erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and the inputs that only it used (the flatten, transpose, softmax it replaced)."""
    todo = [node]
    while todo:
        n = todo.pop()
        if n.users or n.op not in ("call_function", "call_method", "call_module"):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        todo.extend(inputs)
