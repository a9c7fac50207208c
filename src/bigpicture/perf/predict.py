"""Predicted peak memory and time of a plan, before anything runs.

Each tile is walked node by node in the order the tile interpreter computes it
(``execute.Runner.run_tile``), with the box each node computes for that tile (``regions.needs``):

    node box --(steps.py)--> bytes of its value, its temporaries, what autograd saves;
                             seconds of its forward and backward on the device (rates.py)
    walk in order, each value freed at its last use --> the tile's working set, its time

Tiles repeat: one walk per class of tiles that cost alike (grid.py) covers the whole grid, so
a 100,000^2 plan predicts as fast as a 4,096^2 one.

Peak memory is the sum of what is resident at the worst moment:

    parameters and buffers (in the run's dtype)
    + boundary tensors: the dense sinks, at full size (streamed reductions are small); an inference
      on the CPU, only their pages written so far (``resident.py``)
    + the largest tile working set: inference, the values alive at once under last-use freeing (on the
      CPU, with the boundary resident then: the largest over the tiles in run order); training, one
      tile's recompute (what autograd saves) and backward (gradient buffers)
    + training: parameter gradients (one tile's, and the sum so far in float64) and the boundary's
      gradients
    + GPUs: 512 MiB for the CUDA context and library handles, and 10% of the memory that changes
      (caching-allocator slack, cuDNN workspace); the CPU adds nothing (measured as live bytes)

Not counted: optimizer state, the untiled tail's own activations (small after a global pooling),
and the input itself when it already lives on the device (a CPU tensor); a GPU receives each
tile's read box, which is counted.

Time is the sum over tiles of per-op seconds (rates.py) and the interpreter's per-node cost:
one forward for inference; for training, the forward over the tiles (the last one with autograd,
its graph kept for the backward), the recompute with autograd of every other tile, and every
tile's backward. On a GPU the host runs ahead, so each phase takes the longer of
its GPU time and its host time. An input on disk (``source=``) adds its reads, timed on a few read
boxes: overlapped with a GPU's compute by ``net.run``'s reader thread, added to a CPU's (measured:
a 2-core CPU ran a slide 15-25% slower *with* the reader thread than without it).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import fx, nn

from bigpicture.engine.plan import Plan, requested_tiles, tile_of
from bigpicture.engine.split import Split
from bigpicture.engine.tiles import working_counts
from bigpicture.perf.bytes_only import bytes_only
from bigpicture.perf.classes import aggregate, aggregate_passes
from bigpicture.perf.devices import Device, for_torch, get_device, load_calibration
from bigpicture.perf.fusion import fused_rates
from bigpicture.perf.grid import ClassGrid, Layout, class_grid, class_grids, layout
from bigpicture.perf.prediction import Prediction, Stage, _flops, _seconds, _size  # noqa: F401 (re-exported)
from bigpicture.perf.rates import GPU_ASSUMPTIONS, Rates
from bigpicture.perf.reads import read_seconds, with_reads  # noqa: F401 (re-exported)
from bigpicture.perf.resident import boundary_bytes, resident_bytes
from bigpicture.perf.stage_cost import stage_bytes, with_cuts, with_stage_time
from bigpicture.perf.untiled import untiled_flops
from bigpicture.perf.walk import TileWalk, last_tile, tile_at, walk, walked

MiB = 2**20
GPU_CONTEXT_BYTES = 512 * MiB  # CUDA context and cuDNN/cuBLAS handles: 300-600 MiB on recent GPUs
LAST_FROM_CLASSES = True  # False: the last tile walked on its own (tests compare the two)
GPU_FRAGMENTATION = 0.10  # caching allocator slack and cuDNN workspace, on the memory that changes


def resolve_device(device: str | Device | torch.device) -> Device:
    """A ``Device``: a name from the device table, "cpu", or a torch device ("cuda:0": its product)."""
    if isinstance(device, Device):
        return device
    if isinstance(device, torch.device) or (isinstance(device, str) and device.startswith("cuda")):
        return for_torch(device)
    return get_device(device)


def predict(
    plan: Plan,
    device: str | Device | torch.device | None = None,
    training: bool | None = None,
    dtype: torch.dtype | None = None,
    input_grad: bool = False,
    input_on_device: bool | None = None,
    source=None,
    prefetch: bool = True,
    shared: dict | None = None,
) -> Prediction:
    """Peak memory and time of running ``plan`` on ``device`` (a name from the device table or "cpu").

    ``device`` and ``training`` default to the plan's own (``make_plan(..., device=, training=)``).
    ``dtype``: of the run, if not the plan's (a float32 model planned for a bfloat16 GPU run).
    ``input_on_device``: the whole input already lives in the device's memory, so a tile's input is
    a view (default: True for the CPU, False for GPUs, which receive each tile's read box).
    ``source``: the input on disk (a slide, zarr, TIFF or volume path, or a ``bigpicture.io``
    source) that ``net.run`` will read: its read time is measured here on a few of the plan's read
    boxes (``read_seconds``) and added. On a GPU with ``prefetch`` (``net.run``'s default) the reads
    overlap the compute: the longer of the two, plus the first tile's read. On the CPU they add up:
    the reader thread (decoding slide tiles) competes with the compute for the same cores.
    ``shared``: as ``predict_splits``'s; ``{"fused": True}`` predicts compiled tiles (``perf.compiled``).
    """
    if source is not None:
        compute = predict(plan, device, training, dtype, input_grad, False, shared=shared)
        # a GPU computes while the reader thread reads; on the CPU both want the same cores
        return with_reads(compute, read_seconds(plan, source), overlap=prefetch and compute.device != "cpu")
    passes = [*plan.earlier, plan]
    dtype = dtype or plan.dtype
    if not dtype.is_floating_point:  # an integer image the model converts: it computes in its own dtype
        dtype = model_dtype(plan.split.gm)
    return predict_splits(
        [p.split for p in passes],
        plan.input_shape,
        dtype,
        requested_tiles(plan),
        plan.device if device is None else device,
        plan.training if training is None else training,
        input_grad,
        input_on_device,
        shared,
    )


def model_dtype(model: nn.Module | fx.GraphModule) -> torch.dtype:
    """The dtype shapes are propagated in: the model's own (shapes do not depend on it)."""
    if isinstance(model, fx.GraphModule):
        model = model.meta.get("bigpicture_model", model)
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def predict_splits(
    splits: list[Split],
    input_shape,
    dtype: torch.dtype,
    tile,
    device: str | Device = "cpu",
    training: bool = False,
    input_grad: bool = False,
    input_on_device: bool | None = None,
    shared: dict | None = None,
) -> Prediction:
    """The prediction for the passes of a split (``split.stages``) with tiles of ``tile`` input pixels.

    ``shared``: what predictions of other tiles for the same splits, device and dtype may reuse
    (the rates, the steps built, the untiled walk): the planner passes one dict for its candidates."""
    dev, rates, on_device, shared = _setting(device, dtype, input_on_device, shared)
    grids = class_grids(splits, [layout(s, input_shape, tile_of(tile, k)) for k, s in enumerate(splits)])
    memos = [shared.setdefault(id(s), {}) for s in splits]
    passes = [(s, g, _copied(on_device, g), m) for s, g, m in zip(splits, grids, memos, strict=True)]
    totals = aggregate_passes(passes, dtype, rates, training, input_grad)  # every pass's steps at once
    parts = [
        _pass_prediction(s, dtype, g, dev, rates, training, input_grad, c, m, _graph_memo(s, shared), total)
        for (s, g, c, m), total in zip(passes, totals, strict=True)
    ]
    whole = parts[0] if len(parts) == 1 else _combine(parts)
    whole = with_stage_time(whole, splits[-1], dtype, rates, training)  # the untiled global stages
    return with_cuts(whole, splits, input_shape, tile, dtype, rates, training)  # stages cut into tiers


def least_memory(
    splits: list[Split],
    input_shape,
    dtype: torch.dtype,
    tile,
    device: str | Device = "cpu",
    training: bool = False,
    input_grad: bool = False,
    input_on_device: bool | None = None,
    shared: dict | None = None,
) -> int:
    """A lower bound of ``predict_splits(...).memory`` from one tile's walk instead of every class's.

    The predicted peak is the largest over the grid's tiles of one working set plus parts that grow
    with it, so any one tile's working set bounds it from below; the tile in the middle of the tiles
    with work (whole-size boxes, away from the borders) is usually the largest (``memory_walked``).
    The planner skips tiles this already shows over the budget, for the cost of one walk (``shared`` as for
    ``predict_splits``); its walk counts bytes only (``bytes_only.bytes_only``)."""
    dev, rates, on_device, shared = _setting(device, dtype, input_on_device, shared)
    least, item = 0, torch.empty((), dtype=dtype).element_size()
    for k, s in enumerate(splits):
        lay = layout(s, input_shape, tile_of(tile, k))
        working = max((working_counts(s, lay, k) for k in s.sinks), key=math.prod)
        tiles = math.prod(working)  # at least this many tiles have work
        copy, memo = not on_device or tiles > 1, shared.setdefault(("bytes", id(s)), {})
        for index in memory_walked(lay, working):
            need, writes = tile_at(s, lay, index)
            one = walk(s, need, writes, dtype, bytes_only(rates), training, input_grad, copy, memo)
            one.run_peak = one.peak, resident_bytes(s, lay, index, item)  # its class peaks no earlier
            parts = _memory(s, dtype, one, tiles, training, dev.name != "cpu", memo)
            least = max(least, sum(v for _, v in parts))
    return least


def memory_walked(lay: Layout, working: tuple[int, ...]) -> set[tuple[int, ...]]:
    """The grid indices a memory bound walks: ``walk.walked``'s, and the tile over the image's centre,
    whose halo the border clips least: the largest boxes where a receptive field spans the image
    (DenseNet121 3D at 2,048^3, tile 96: 248 GiB there, 232 GiB one tile further)."""
    centre = tuple(min(i[-1][1] // 2 // t, c - 1) for i, t, c in zip(lay.intervals, lay.tile, working))
    return walked(working) | {centre}


def _graph_memo(split: Split, shared: dict) -> dict:
    """What the passes of ``split``'s graph share in ``shared``: the model's sizes and each node's
    untiled flops (``untiled.py``), asked once however many passes hold the node."""
    return shared.setdefault(("graph", id(split.gm)), {})


def _setting(device, dtype, input_on_device, shared):
    """(device, its rates, whether the input lives on it, ``shared``): the rates made once per ``shared``."""
    dev = resolve_device(device)
    shared = {} if shared is None else shared
    if "rates" not in shared:
        shared["rates"] = Rates(dev, dtype, None if dev.name != "cpu" else load_calibration())
        if shared.get("fused"):  # compiled tiles: fused chains, no interpreter (perf.compiled)
            fused_rates(shared["rates"])
    on_device = dev.name == "cpu" if input_on_device is None else input_on_device
    return dev, shared["rates"], on_device, shared


def _predict_pass(
    split: Split,
    input_shape,
    dtype,
    lay: Layout,
    dev: Device,
    rates: Rates,
    training: bool,
    input_grad: bool,
    on_device: bool,
    memo: dict | None = None,
    graph: dict | None = None,
) -> Prediction:
    """One pass's prediction; ``memo``: kept between its predictions, ``graph``: ``_graph_memo``'s."""
    memo = {} if memo is None else memo
    classes = class_grid(split, lay)
    copy = _copied(on_device, classes)
    total = aggregate(split, classes, dtype, rates, training, input_grad, copy, memo)
    return _pass_prediction(split, dtype, classes, dev, rates, training, input_grad, copy, memo, graph, total)


def _copied(on_device: bool, classes: ClassGrid) -> bool:
    """Whether each tile's read box is copied: execute.Runner.read_input copies it (contiguous) even
    from an input that already lives on the device (``on_device``); one tile runs the model on the
    input itself."""
    return not on_device or classes.tiles > 1


def _pass_prediction(
    split: Split,
    dtype,
    classes: ClassGrid,
    dev: Device,
    rates: Rates,
    training: bool,
    input_grad: bool,
    copy: bool,
    memo: dict,
    graph: dict | None,
    total: TileWalk,
) -> Prediction:
    """``_predict_pass`` from the grid's tiles summed (``classes.aggregate``): ``total``."""
    gpu, graph = dev.name != "cpu", memo if graph is None else graph
    tiles, lay = classes.tiles, classes.lay
    if "untiled" not in memo:  # the forward's flops over the whole image, for the halo overhead
        memo["untiled"] = untiled_flops(split, dtype, rates, graph.setdefault("untiled", {}))
    untiled = memo["untiled"]
    memory_parts = _memory(split, dtype, total, tiles, training, gpu, graph)
    last = total.last if LAST_FROM_CLASSES else None  # the tile whose graph the forward keeps: the
    if training and last is None:  # backward does not recompute it (read off its class where it can be)
        need, writes = last_tile(split, lay)
        last = walk(split, need, writes, dtype, rates, training, input_grad, copy, memo)
    stages, by_kind = _time([(1, total)], training, gpu, rates, last)
    flops = sum(s.flops for s in stages)
    return Prediction(
        device=dev.name,
        dtype=dtype,
        training=training,
        tile=lay.tile,
        tiles=tiles,
        classes=classes.classes,
        memory=sum(v for _, v in memory_parts),
        time=sum(s.seconds for s in stages),
        flops=flops,
        halo_overhead=total.flops_fwd / untiled - 1 if untiled else 0.0,
        memory_parts=memory_parts,
        stages=stages,
        by_kind=by_kind,
        assumptions=_assumptions(dev, rates),
    )


def _combine(passes: list[Prediction]) -> Prediction:
    """Passes run one after the other: times add up, the largest pass sets the peak."""
    first, peak = passes[0], max(passes, key=lambda p: p.memory)
    stages = tuple(
        Stage(f"pass {i + 1} {s.name}", s.flops, s.seconds) for i, p in enumerate(passes) for s in p.stages
    )
    kinds: dict = {}
    for p in passes:
        for k, v in p.by_kind:
            kinds[k] = kinds.get(k, 0.0) + v
    work = sum(p.flops for p in passes)
    return replace(
        first,
        tiles=sum(p.tiles for p in passes),
        classes=sum(p.classes for p in passes),
        memory=peak.memory,
        memory_parts=peak.memory_parts,
        time=sum(p.time for p in passes),
        flops=work,
        stages=stages,
        halo_overhead=sum(p.halo_overhead * p.flops for p in passes) / work if work else 0.0,
        by_kind=tuple(sorted(kinds.items(), key=lambda kv: -kv[1])),
    )


def _memory(split: Split, dtype, total: TileWalk, tiles: int, training: bool, gpu: bool, memo=None):
    """The parts of the predicted peak; ``memo``: where the model's sizes are kept between calls."""
    item, memo = torch.empty((), dtype=dtype).element_size(), {} if memo is None else memo
    if "model sizes" not in memo:  # a deep model's parameters take milliseconds to list: once per planner
        model = split.gm.meta.get("bigpicture_model", split.gm)
        ps = list(model.parameters())
        memo["model sizes"] = (sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad),
                               sum(b.numel() for b in model.buffers()))  # fmt: skip
    params, trainable, buffers = memo["model sizes"]
    params, buffers = params * item, buffers * item
    boundary = boundary_bytes(split, item)  # the dense sinks (a stage cut's holds: stage_cost.with_cuts)
    working, resident = (total.peak_train if training else total.peak), boundary
    if not (training or gpu) and total.run_peak is not None:  # the CPU: pages written so far (resident.py)
        working, resident = total.run_peak
    parts = [("parameters", params + buffers), ("boundary tensors", resident), ("tile working set", working)]
    key = ("stage bytes", id(split), dtype, training)  # the split's (a memo may serve every pass of a graph)
    memo[key] = memo[key] if key in memo else stage_bytes(split, dtype, training)  # per candidate and walk
    parts += [("global stages", memo[key])]  # tensors held whole between passes
    if training:
        # the sum of the tiles' parameter gradients, kept in float64 (execute.Runner.backward), the
        # previous tile's (alive until the next tile's are returned) and this tile's; the boundary's.
        # One tile runs the model with plain autograd: its gradients only.
        wide = 8 if dtype.is_floating_point else item
        per_param = item if tiles == 1 else 2 * item + wide
        parts += [("parameter gradients", trainable * per_param), ("boundary gradients", boundary)]
    if gpu:
        changing = boundary * (2 if training else 1) + working
        parts += [
            (
                "framework (CUDA context, allocator, workspace)",
                GPU_CONTEXT_BYTES + int(GPU_FRAGMENTATION * changing),
            )
        ]
    return tuple(parts)


def _time(
    walks: list[tuple[int, TileWalk]], training: bool, gpu: bool, rates: Rates, last: TileWalk | None = None
):
    """Seconds by stage. Training (``execute.TiledFunction``): the forward runs every tile without
    autograd but the last one (``last``), whose graph it keeps; the backward starts from that tile
    and recomputes every other tile with autograd before its backward."""
    kept = last if training and last is not None else TileWalk()
    grad_node_s = rates.train_node_s / 2  # the engine's cost per node of a forward with autograd
    phases = [("forward", "fwd", rates.node_s, None)]
    if training:
        phases += [("recompute", "fwd", grad_node_s, kept), ("backward", "bwd", grad_node_s, None)]
    stages, kinds = [], {}
    for name, phase, per_node, minus in phases:
        signed = [(n, w) for n, w in walks] + ([(-1, minus)] if minus is not None else [])
        device_s = sum(n * getattr(w, f"{phase}_s") for n, w in signed)
        host_s = sum(n * (w.nodes * per_node + w.ops * rates.host_op_s) for n, w in signed)
        if name == "forward":  # the kept tile's forward runs with autograd
            host_s += kept.nodes * (grad_node_s - per_node)
        flops = sum(n * getattr(w, f"flops_{phase}") for n, w in signed)
        for n, w in signed:
            for kind, sec in getattr(w, f"{phase}_by_kind").items():
                kinds[kind] = kinds.get(kind, 0.0) + n * sec
        if gpu:  # the host runs ahead of the GPU: a phase takes the longer of the two
            stages.append(Stage(name, flops, max(device_s, host_s)))
        else:
            stages.append(Stage(name, flops, device_s))
            kinds["engine"] = kinds.get("engine", 0.0) + host_s
    if not gpu:
        stages.append(Stage("engine (interpreter)", 0, kinds["engine"]))
    return tuple(stages), tuple(sorted(kinds.items(), key=lambda kv: -kv[1]))


def _assumptions(dev: Device, rates: Rates) -> str:
    if rates.gpu:
        return (
            f"{dev.source}; {GPU_ASSUMPTIONS} Memory adds {GPU_CONTEXT_BYTES // MiB} MiB of CUDA context and "
            f"{100 * GPU_FRAGMENTATION:.0f}% allocator/workspace slack."
        )
    if rates.measured:
        return f"local CPU, {dev.source}; rates interpolated from the calibration."
    return "local CPU, uncalibrated: nominal rates (run `bigpicture calibrate` for measured ones)."
