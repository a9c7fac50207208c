"""Memory and time of global stages (``engine/stages.py``): the tensors held whole between passes
and the untiled subgraphs (attention on tokens, LayerNorm over tokens) that make them.

A rough model, its assumptions written down:

- memory: the stages' whole tensors and every value of their untiled subgraphs are resident at
  once for the whole step (the evaluator keeps them, and autograd saves most of them for the
  backward); training doubles it for their gradients. An upper bound (the evaluator frees nothing
  early, but autograd does not save every value). Attention's L x L scores count where the graph
  computes them (matmul, softmax: MONAI's SABlock); a fused ``scaled_dot_product_attention`` does
  not materialise them on the CPU (flash kernel) and is counted by its output only.
- time: the untiled subgraphs are memory-bound: each value is written once and read once at the
  device's stream rate (``Rates.stream``), plus the interpreter's cost per node, and a backward
  costs twice a forward. Attention's matrix
  products (about 4 L^2 d FLOPs for L tokens of width d) are not counted: at a patch embedding's
  1/16 resolution L is small; at full resolution the memory check stops the plan first.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from bigpicture.engine import stages as staging
from bigpicture.engine.capture import describe
from bigpicture.engine.split import Split
from bigpicture.errors import TilingError
from bigpicture.perf.prediction import Prediction, Stage
from bigpicture.perf.rates import Rates


def stage_bytes(split: Split, dtype: torch.dtype, training: bool) -> int:
    """Bytes the global stages hold through a step (0 without stages)."""
    held, values = staging.held_elements(split)
    item = torch.empty((), dtype=dtype).element_size()
    return (held + values) * item * (2 if training else 1)


def stage_seconds(split: Split, dtype: torch.dtype, rates: Rates, training: bool) -> float:
    """Seconds of the untiled subgraphs: their values written and read once, plus the evaluator's
    cost per node (the tile interpreter's); a backward twice that."""
    nodes = {n for s in staging.sources(split) for n in staging.untiled(split.roles, s)}
    _, values = staging.held_elements(split)
    moved = 2 * values * torch.empty((), dtype=dtype).element_size()
    if not moved:
        return 0.0
    return (moved / rates.stream("unary", moved) + len(nodes) * rates.node_s) * (3 if training else 1)


def with_stage_time(p: Prediction, split: Split, dtype: torch.dtype, rates: Rates, training: bool):
    """``p`` with the untiled subgraphs' seconds added as a stage of its own."""
    seconds = stage_seconds(split, dtype, rates, training)
    if not seconds:
        return p
    stages = p.stages + (Stage("global stages (untiled)", 0, seconds),)
    return replace(p, time=p.time + seconds, stages=stages)


def check_budget(split: Split, dtype: torch.dtype, training: bool, budget: int) -> None:
    """A ``TilingError`` when the stages alone need more than ``budget`` bytes: no tile changes that."""
    need = stage_bytes(split, dtype, training)
    if need <= budget:
        return
    item = torch.empty((), dtype=dtype).element_size()
    held, values = staging.held_elements(split)
    first = staging.sources(split)[0]
    op = staging.maker(split.gm, split.roles, first)
    grads = ", doubled for gradients" if training else ""
    raise TilingError(
        f"the global stages need {staging.size(need)} (whole tensors {staging.size(held * item)}, their "
        f"untiled subgraphs' values {staging.size(values * item)}{grads}), "
        f"more than the budget of {staging.size(budget)}: {staging.describe(split, item)}. The stage is made "
        f"by {describe(split.gm, op)}, which needs every position at once (attention over all tokens, a "
        "norm over tokens), so tiles cannot bound it. Give it fewer positions (a larger patch embedding, "
        "or windowed attention), a larger memory budget, or a smaller dtype." + _windows(split)
    )


def _windows(split: Split) -> str:
    """Swin's shifted windows (a ``roll`` in the stage): why they are held whole, not tiled."""
    nodes = {n for s in staging.sources(split) for n in staging.untiled(split.roles, s)}
    if not any("roll" in str(n.target) or _in_window_module(split, n) for n in nodes):
        return ""
    return (
        " Window attention (Swin) is held whole too: its windows are local, but bigpicture does not yet "
        "align tiles with the window grid of every resolution (and the shifted windows' roll), so it is "
        "exact only while the stage fits."
    )


def _in_window_module(split: Split, node) -> bool:
    """Whether a module call sits in a module whose class names windows (Swin's ``WindowAttention``)."""
    if node.op != "call_module":
        return False
    model, parts = split.gm.meta.get("bigpicture_model", split.gm), node.target.split(".")
    try:  # the user's own modules: the captured graph keeps only the leaves' classes
        owners = [model.get_submodule(".".join(parts[:k])) for k in range(1, len(parts))]
    except AttributeError:
        return False
    return any("window" in type(m).__name__.lower() for m in owners)
