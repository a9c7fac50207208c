"""Ops that compute each spatial position from the same position of their inputs.

Activations, eval-mode normalisation with running statistics, eval-mode dropout, arithmetic,
and the graph structure of residual networks, DenseNets and UNets (add, cat and split along
channels). Some are pointwise only in some states (BatchNorm in eval mode, softmax over
channels): their rules check the state and say what to change.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_aggregate

from bigpicture.engine.rules import Pointwise, register_pointwise, rule
from bigpicture.engine.rules.resample import Slice
from bigpicture.errors import TilingError

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Identity,
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.prelu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.logsigmoid, F.threshold,
    torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
)  # fmt: skip
_ARITHMETIC = (
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.pow, torch.clamp, torch.clip, torch.where, torch.maximum, torch.minimum,
)  # fmt: skip
_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "add", "add_", "sub", "sub_", "mul", "mul_",
    "div", "div_", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "pow", "clamp", "clamp_", "clip",
    "float", "double", "half", "bfloat16", "to", "type_as", "contiguous", "clone",
)  # fmt: skip
register_pointwise(*_ACTIVATIONS, *_ARITHMETIC, *_METHODS)


def _spatial_dims(dims, ndim) -> set[int]:
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return {d % ndim for d in dims} & set(range(2, ndim))


@rule(torch.cat, torch.concat, torch.concatenate, torch.chunk, torch.split, "chunk", "split",
      F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax",
      nn.Softmax, nn.LogSoftmax, nn.Softmax2d)  # fmt: skip
def along_channels(node, ctx):
    """Pointwise when the dimension they act along is not spatial."""
    if node.op == "call_module":
        m = ctx.module(node)
        dim = -3 if isinstance(m, nn.Softmax2d) else m.dim
    else:
        # Position of `dim` in node.args (a method's args start with the tensor itself, too).
        fname = node.target if isinstance(node.target, str) else node.target.__name__
        position = 2 if fname in ("chunk", "split") else 1
        args = node.args
        dim = ctx.static(node.kwargs.get("dim", args[position] if len(args) > position else 0))
    if dim is None or _spatial_dims(dim, ctx.ndim):
        raise TilingError(
            f"{ctx.where(node)}: {ctx.op_name(node)} acts along dimension {dim}, a spatial one; only "
            "channel-wise concatenation, splitting and softmax can be tiled."
        )
    return Pointwise(node, ctx)


@rule(operator.getitem)
def getitem(node, ctx):
    """An item of a tuple (a channel split) is pointwise; indexing a tensor is a slice."""
    if isinstance(ctx.meta(node.args[0]), (tuple, list)):
        return Pointwise(node, ctx)
    index = map_aggregate(node.args[1], ctx.meta)  # tensors (advanced indexing) are refused by Slice
    return Slice(node, ctx, index)


def _check_norm(node, ctx, uses_batch_stats: bool):
    m = ctx.module(node)
    if not uses_batch_stats:
        return Pointwise(node, ctx)
    name = type(m).__name__
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
        raise TilingError(
            f"{ctx.where(node)}: {name} is in training mode, so it normalises with statistics of the "
            "whole batch and image, which one pass over the tiles cannot see, and multipass=False allows "
            "one pass only. The default, `bp.tiled(model, ..., multipass=True)`, makes it exact (one more "
            "pass over the tiles per level of BatchNorm); faster: "
            "`bp.freeze_batchnorm(model)` keeps BatchNorm layers in eval mode while the rest trains, or "
            "call `model.eval()`."
        )
    raise TilingError(
        f"{ctx.where(node)}: {name} normalises with statistics over the whole image (a global op) in the "
        "middle of the local part, which one pass over the tiles cannot reproduce, and multipass=False "
        "allows one pass only. Without multipass=False (the default) it is exact with one more pass over "
        "the tiles per level of such ops; or use running statistics in eval mode (track_running_stats=True)."
    )


@rule(nn.modules.batchnorm._BatchNorm)
def batch_norm(node, ctx):
    m = ctx.module(node)
    return _check_norm(node, ctx, m.training or m.running_mean is None)


@rule(nn.modules.instancenorm._InstanceNorm)
def instance_norm(node, ctx):
    m = ctx.module(node)
    return _check_norm(node, ctx, m.training or not m.track_running_stats)


@rule(nn.modules.dropout._DropoutNd, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
def dropout(node, ctx):
    if node.op == "call_module":
        m = ctx.module(node)
        active = m.training and m.p > 0
    else:
        p = ctx.static(node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5))
        training = ctx.static(node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True))
        active = training and p > 0
    if active:
        raise TilingError(
            f"{ctx.where(node)}: dropout in training mode draws a random mask over the whole image that "
            "tiles cannot reproduce. Put dropout layers in eval mode (or p=0) in the tiled part; dropout "
            "in the head after a global pooling is fine."
        )
    return Pointwise(node, ctx)


@rule(torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin")
def reduction(node, ctx):
    """Over channels only: pointwise. Over every spatial dimension: a streamed reduction."""
    from bigpicture.engine.rules.reduce import StreamedReduction

    args = node.args[1:]
    dim = ctx.static(node.kwargs.get("dim", args[0] if args else None))
    spatial = set(range(2, ctx.ndim))
    covered = spatial if dim is None else _spatial_dims(dim, ctx.ndim)
    if not covered:
        return Pointwise(node, ctx)
    if covered == spatial:
        return StreamedReduction(node, ctx)
    raise TilingError(
        f"{ctx.where(node)}: {ctx.op_name(node)} reduces over some spatial dimensions ({sorted(covered)}) "
        "but not all; reduce over every spatial dimension, or over channels only."
    )
