"""The functional norms, ``F.group_norm``, ``F.instance_norm`` and ``F.batch_norm(training=True)``,
rewritten at capture into the statistics and normalisation that ``stats.py`` makes exact by an
extra pass over the tiles (the module forms are rewritten there)::

    F.group_norm(a, G, w, b, eps)                  ->  normalize(a, moments(a, G), w, b, eps, G)
    F.instance_norm(a, w=w, b=b)                   ->  the same with G = channels_of(a)
    F.batch_norm(a, rm, rv, w, b, training=True)   ->  batch_normalize(a, batch_moments(a), w, b, eps)
                                                        and the running statistics' update
    F.instance_norm(a, rm, rv, use_input_stats=False) ->  F.batch_norm(a, rm, rv, w, b, False, 0, eps)

A flag or group count computed from tensors at run time is left alone (a clear error follows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from bigpicture.engine.rules import _bind_values, _replaces
from bigpicture.engine.rules.stats import (
    batch_moments,
    batch_normalize,
    instance_running_stats,
    moments,
    normalize,
    positions_per_channel,
    positions_per_instance,
    track_running_stats,
)

_GROUP = (["num_groups", "weight", "bias", "eps"], {"weight": None, "bias": None, "eps": 1e-5})
_INSTANCE = (
    ["running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"],
    {"running_mean": None, "running_var": None, "weight": None, "bias": None, "use_input_stats": True,
     "momentum": 0.1, "eps": 1e-5},
)  # fmt: skip
_BATCH = (
    ["running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"],
    {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
)  # fmt: skip


def channels_of(a: torch.Tensor) -> int:
    return a.shape[1]


def _group_norm(add, a, k: dict) -> fx.Node:
    groups = k["num_groups"]
    stats = add(moments, a, groups)
    return add(normalize, a, stats, k["weight"], k["bias"], k["eps"], groups)


def _instance_norm(add, a, k: dict) -> fx.Node | None:
    if k["use_input_stats"] is False:
        buffers = (k["running_mean"], k["running_var"])
        return add(F.batch_norm, a, *buffers, k["weight"], k["bias"], False, 0.0, k["eps"])
    if k["use_input_stats"] is not True:
        return None
    channels = add(channels_of, a)
    stats = add(moments, a, channels)
    if k["running_mean"] is not None:
        count = add(positions_per_instance, a)
        add(instance_running_stats, stats, k["running_mean"], k["running_var"], k["momentum"], count)
    return add(normalize, a, stats, k["weight"], k["bias"], k["eps"], channels)


def _batch_norm(add, a, k: dict) -> fx.Node | None:
    if k["training"] is not True:
        return None  # running statistics: pointwise (reduce.functional_batch_norm)
    stats = add(batch_moments, a)
    if k["running_mean"] is not None:
        count = add(positions_per_channel, a)
        add(track_running_stats, stats, k["running_mean"], k["running_var"], None, k["momentum"], count)
    return add(batch_normalize, a, stats, k["weight"], k["bias"], k["eps"])


_REWRITES = {F.group_norm: (_group_norm, _GROUP), F.instance_norm: (_instance_norm, _INSTANCE),
             F.batch_norm: (_batch_norm, _BATCH)}  # fmt: skip


def fuse_functional_norm(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The nodes that replace ``node``, a functional norm over the whole image, or None."""
    if node.op != "call_function" or node.target not in _REWRITES:
        return None
    rewrite, (names, defaults) = _REWRITES[node.target]
    kwargs = dict(node.kwargs)
    a = kwargs.pop("input", node.args[0] if node.args else None)

    def add(fn, *args) -> fx.Node:
        """A node named after ``node`` (``group_norm_moments``), on the user's line, for errors."""
        new = gm.graph.create_node("call_function", fn, args, name=f"{node.name}_{fn.__name__}")
        _replaces(gm, node, new)
        return new

    new = rewrite(add, a, _bind_values((a, *node.args[1:]), kwargs, names, defaults))
    if new is not None:
        new.meta["bigpicture_origin"] = f"F.{node.target.__name__} `{node.name}`"
    return new
