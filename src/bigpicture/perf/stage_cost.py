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

from bigpicture.engine import cuts as cutting
from bigpicture.engine import stages as staging
from bigpicture.engine.capture import describe
from bigpicture.engine.plan import tile_of
from bigpicture.engine.split import Split
from bigpicture.engine.tiles import layout
from bigpicture.errors import TilingError
from bigpicture.perf.devices import HOST_LINKS, get_interconnect
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


# -- cuts: a tiled node's whole value kept in a tier between passes (engine/cuts.py) -----------------

DISK_BYTES_PER_S = 1e9  # the zarr tier: a local NVMe SSD's sequential rate (1-7 GB/s), compression aside


def link_seconds(tier: str, nbytes: int, rates: Rates) -> float:
    """Seconds to move ``nbytes`` between the device and a cut's tier: a GPU's host link
    (``devices.HOST_LINKS``: PCIe or NVLink-C2C) for the host tier, a copy at the device's stream
    rate for the device tier (and for the CPU's host tier, the same memory), the disk for zarr."""
    if not nbytes:
        return 0.0
    if tier == "zarr":
        return nbytes / DISK_BYTES_PER_S
    if tier == "host" and rates.gpu:
        return nbytes / host_link(rates.device.name).bandwidth_bytes_per_s
    return nbytes / rates.stream("unary", nbytes)


def host_link(name: str):
    """The link between a device of the table and its host's memory (PCIe 4 where unknown)."""
    return get_interconnect(HOST_LINKS.get(name, "PCIe4"))


def resident(tier: str, gpu: bool) -> bool:
    """Whether a cut's whole tensor takes the device's memory: the device tier, or the CPU's host."""
    return tier == "device" or (tier == "host" and not gpu)


def with_cuts(p: Prediction, splits, input_shape, tile, dtype, rates: Rates, training: bool) -> Prediction:
    """``p`` with the cuts' transfers as a stage of their own and their whole tensors (and, in
    training, gradients) in memory where they take the device's (``resident``). Transfers are not
    overlapped with the compute (the tiles copy synchronously)."""
    item = torch.empty((), dtype=dtype).element_size()
    passes = [(s, layout(s, input_shape, tile_of(tile, k))) for k, s in enumerate(splits)]
    rows = cutting.traffic(passes, item, training)
    if not rows:
        return p
    seconds = sum(link_seconds(r.tier, r.moved, rates) for r in rows)
    tiers = ", ".join(sorted({r.tier for r in rows}))
    held = sum(r.held for r in rows if resident(r.tier, rates.gpu)) * (2 if training else 1)
    stage = Stage(f"cut traffic ({tiers}: {staging.size(sum(r.moved for r in rows))})", 0, seconds)
    parts = p.memory_parts + (("cuts held (device memory)", held),)
    return replace(p, time=p.time + seconds, stages=p.stages + (stage,), memory=p.memory + held,
                   memory_parts=parts)  # fmt: skip


def host_bytes(rows, training: bool) -> int:
    """Bytes the cuts keep in host memory (the host tier; on the CPU the same memory as the run's),
    gradients included in training."""
    return sum(r.held for r in rows if r.tier == "host") * (2 if training else 1)
