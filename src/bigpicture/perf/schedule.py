"""Choose the tile: the fastest predicted one whose predicted peak memory fits the budget.

    tile sides  unit x {1, 1.5, 2, 3, 4, 6, ...} up to the whole image, where unit is the
                network's total stride (tiles must be whole output pixels)
        --> predict each (no tensor allocated; the tile grid is walked per class of tile)
        --> keep those whose predicted peak <= budget --> least predicted time

A budget no tile fits is a ``TilingError`` that says the least memory that would do.
"""

from __future__ import annotations

import gc
import math
import re
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import NamedTuple

import torch
from torch import fx, nn

from bigpicture.engine import capture as g
from bigpicture.engine.plan import Plan, capture, plan_graph, plan_splits, split_graph
from bigpicture.engine.split import Split, split, stages
from bigpicture.engine.tiles import layout
from bigpicture.errors import TilingError
from bigpicture.perf.bound import engine_bound
from bigpicture.perf.compiled import compiled_plan
from bigpicture.perf.cuts import cut_splits, host_budget
from bigpicture.perf.devices import Device
from bigpicture.perf.multi import best_on_devices, with_devices
from bigpicture.perf.predict import (
    Prediction,
    _setting,
    _size,
    model_dtype,
    predict,
    resolve_device,
)
from bigpicture.perf.search import least_prediction, search
from bigpicture.perf.stage_cost import check_budget

MAX_TILES = 2**16  # more, smaller tiles are never faster: their halo work and per-tile costs grow
_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tib": 2**40,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
}


def parse_memory(memory: str | int | float) -> int:
    """Bytes from ``8GiB``, ``"512 MiB"``, ``"8GB"`` (decimal), ``"8G"`` (binary) or a number of bytes.

    ``str(prediction)`` and the planner's errors write sizes the same way: ``"1,023.50 MiB"`` reads back.
    """
    if isinstance(memory, (int, float)) and not isinstance(memory, bool):
        return int(memory)
    # thousands separators as error messages print them: "1,023.50 MiB"
    match = re.fullmatch(
        r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(memory).replace(",", "").replace("_", "")
    )
    if not match or match[2].lower() not in _UNITS:
        raise TilingError(
            f"memory={memory!r} is not a size: write e.g. '8GiB', '512MiB', '24GB' or a number of bytes."
        )
    return int(float(match[1]) * _UNITS[match[2].lower()])


def analyse(
    model: nn.Module | fx.GraphModule, input_shape, multipass: bool = True, inputs: list | None = None
) -> list[Split]:
    """The passes of the model's split for one input shape (what every tile size shares).

    ``inputs``: the placeholders' (shape, dtype, device) or values, as ``plan.plan_graph`` takes them
    (default: the input alone, on fake CPU tensors in the model's dtype).
    """
    if len(input_shape) < 3:
        raise TilingError(
            f"input shape {tuple(input_shape)} has no spatial dimension: expected (N, C, *spatial)."
        )
    inputs = inputs or [(tuple(input_shape), model_dtype(model), torch.device("cpu"))]
    gm = model if isinstance(model, fx.GraphModule) else capture(model, multipass, inputs)
    values = g.propagate(gm, inputs)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return stages(split(gm, values, x, multipass))


def candidates(splits: list[Split], input_shape) -> list[tuple[int, ...]]:
    """Tile shapes worth predicting: cubes of side unit x 2^k and 3 x 2^(k-1), and the whole image.

    The unit is the deepest node's stride (of every node, so also every sink's): tile edges then
    lie on every node's pixel grid, so no deep pixel is computed by two tiles, and a tile's boxes
    are its neighbour's moved by whole pixels of every node. Interior tiles are then one class,
    and the classes per dimension are those near the borders (``grid._dim_keys``); a tile of 12
    on a network of stride 16 repeats only every 4 tiles, and its 3D prediction had 15^3 classes.
    """
    spatial = tuple(input_shape[2:])
    unit = math.lcm(*[f.numerator for s in splits for n in s.strides for f in s.strides[n]])
    per_dim = math.floor(MAX_TILES ** (1 / len(spatial)) + 1e-9)  # 256 in 2D, 40 in 3D
    smallest = max(unit, math.ceil(max(spatial) / per_dim))
    sides, m = set(), 1
    while unit * m < 2 * max(spatial):
        for side in (unit * m, unit * (3 * m // 2)):
            if smallest <= side < max(spatial):
                sides.add(side)
        m *= 2
    shapes = {tuple(min(s, n) for n in spatial) for s in sides} | {spatial}
    return sorted(shapes, key=math.prod)


class Choice(NamedTuple):
    tile: tuple[int, ...]
    plan: Plan | None
    prediction: Prediction


def choose_tile(
    model: nn.Module | fx.GraphModule,
    input_shape,
    budget_bytes: int | str,
    device: str | Device = "cpu",
    dtype: torch.dtype = torch.float32,
    training: bool = False,
    multipass: bool = True,
    make_plan: bool = True,
) -> Choice:
    """The tile with the least predicted time whose predicted peak memory is at most the budget.

    ``budget_bytes``: bytes or a size such as ``"8GiB"``; ``device``: a name from the device table
    or "cpu"; ``dtype``: of the run. Returns the tile, its plan (None with ``make_plan=False``) and
    its prediction, whose ``note`` says why it was chosen. A budget no tile fits is a
    ``TilingError`` naming the least memory that would do.
    """
    shapes = [(tuple(input_shape), model_dtype(model), torch.device("cpu"))]
    gm = model if isinstance(model, fx.GraphModule) else capture(model, multipass, shapes)
    dev = resolve_device(device)
    with settled_heap():
        splits = analyse(gm, input_shape, multipass)
        best = best_tile(splits, input_shape, budget_bytes, dev, dtype, training)
    if not make_plan:
        return Choice(best.tile, None, best)
    plan = plan_splits(splits, input_shape, model_dtype(gm), best.tile)  # the splits it predicted
    return Choice(best.tile, for_run(plan, dtype, dev, training, best), best)


def for_run(plan: Plan, dtype, device, training: bool, prediction: Prediction | None = None) -> Plan:
    """``plan`` for a run on ``device`` (and in ``dtype``, unless None), with the performance model
    attached: ``plan.prediction`` is computed on first use, or is ``prediction`` if known already."""
    dtype = plan.dtype if dtype is None else dtype
    run = dict(dtype=dtype, device=device, training=training, predictor=_predict)
    earlier = tuple(replace(e, **run) for e in plan.earlier)
    note = prediction.note if prediction is not None else ""
    plan = replace(plan, **run, note=note, earlier=earlier)
    if prediction is not None:
        plan.__dict__["prediction"] = prediction  # the slot of Plan.prediction (a cached_property)
    return plan


def _predict(plan: Plan) -> Prediction:
    p = predict(plan)
    return p.with_note(plan.note) if plan.note else p


def best_tile(
    splits: list[Split],
    input_shape,
    budget_bytes: int | str,
    device: str | Device = "cpu",
    dtype: torch.dtype = torch.float32,
    training: bool = False,
) -> Prediction:
    """The prediction of the fastest tile that fits (see ``choose_tile``), for an analysed model."""
    with settled_heap():
        return _best_tile(splits, input_shape, budget_bytes, device, dtype, training)


@contextmanager
def settled_heap():
    """Python's cyclic garbage collector paused until exit, then as it was (also after an error).

    The planner makes millions of short-lived tuples, lists and arrays, hardly any of them in a
    reference cycle: reference counting frees them as before. The collector's passes freed nothing
    and cost 4-7% of the slowest census plans even with the model, its graphs and caches frozen
    out of them (``gc.freeze``, this function before: 0.25-0.5 s of SENet154-2d, SEResNet152-2d and
    DenseNet264-2d at 16,384^2 on the CPU, measured with ``gc.callbacks``), and without them the
    plans' peak RSS is the same (``ru_maxrss``). A collector paused already (by the caller, or an
    enclosing plan) is left paused."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _best_tile(splits, input_shape, budget_bytes, device, dtype, training) -> Prediction:
    budget, dev = parse_memory(budget_bytes), resolve_device(device)
    check_budget(splits[-1], dtype, training, budget)  # global stages no tile size changes
    # from the largest tile down, skipping those bounds show over the budget or slower (search.py)
    tiles = candidates(splits, input_shape)
    tried, bounds, shared, skipped, needs = search(splits, input_shape, tiles, budget, dev, dtype, training,
                                                   least_time)  # fmt: skip
    fits = [p for p in tried if p.memory <= budget]
    if not fits:
        p = least_prediction(splits, input_shape, dtype, dev, training, tried, bounds, shared)
        parts = ", ".join(f"{k} {_size(v)}" for k, v in p.memory_parts if v)
        smaller = " use a smaller dtype," if torch.empty((), dtype=dtype).element_size() > 2 else ""
        raise TilingError(
            f"no tile fits {_size(budget)} on {dev.name}: the smallest predicted peak is {_size(p.memory)}, "
            f"with tile {_side(p.tile)} ({parts}). Give memory of at least {_size_up(p.memory)},{smaller} or "
            "use a device with more memory."
        )
    best = min(fits, key=lambda p: (p.time, -math.prod(p.tile)))
    note = f"fastest predicted of the {len(fits)} tile sizes (of {len(tried)}) that fit {_size(budget)}"
    note += f", {skipped} more bounded slower" if skipped else ""
    bigger = [t for t in sorted({*bounds, *needs}, key=math.prod) if math.prod(t) > math.prod(best.tile)]
    if bigger:
        known = {**{p.tile: p.memory for p in tried}, **needs}
        need = known.get(bigger[0])
        need = _size(need) if need is not None else f"more than {_size(bounds[bigger[0]])}"
        note += f"; the next larger, {_side(bigger[0])}, needs {need}"
    return best.with_note(note)


def make_plan(
    model: torch.nn.Module,
    input_shape,
    tile=None,
    dtype=torch.float32,
    device="cpu",
    multipass=True,
    training=False,
    memory=None,
    devices: int = 1,
    nodes: int | None = None,
    cuts=None,
    host_memory=None,
    compile: bool = False,
) -> Plan:
    """The plan for ``model`` on an input of ``input_shape`` (N, C, *spatial), with no tensor allocated.

    ``tile``: the input extent each tile owns (one int, or one per spatial dimension). Without it
    (or with ``"auto"``) the planner chooses the fastest predicted tile that fits ``memory``
    (default: the device's memory; on the CPU half of the machine's, ``default_budget``), and
    ``plan.note`` says so. Giving ``memory=`` (bytes or a size like ``"8GiB"``) also lets the
    planner choose; ``tile`` and ``memory`` together are a TypeError. A budget no tile fits is a
    ``TilingError`` naming the least memory that would do.
    ``device``: what the prediction is for: a name from the device table (``"H100-SXM"``, see
    ``bigpicture.perf.devices.DEVICES``), ``"cpu"`` (this machine), a ``devices.Device`` or a CUDA device.
    ``dtype``: of the run; ``training``: predict one forward and backward, else one forward.
    ``multipass``: global norms and squeeze-excitation take extra passes over the tiles (default);
    False makes them an error.
    Shapes are found on fake CPU tensors in the model's own dtype, so a plan for a 100,000^2 slide
    on a GPU takes seconds here. ``plan.prediction`` (and ``plan.memory``, bytes; ``plan.time``,
    seconds; ``plan.flops``) is computed on first use; ``print(plan)`` shows it.
    ``devices``: predict one image's tiles shared by that many ranks (``bp.tiled(..., group=)``) on
    ``nodes`` nodes (default 8 devices per node): each rank's share, the imbalance and the
    communication over the device's links (``perf.multi.predict_devices``).
    ``cuts``: cut the network into stages at these nodes (names, or a mapping of them to tiers "host",
    "device", "zarr"), or ``"auto"`` for the planner's cuts; each cut's whole value is kept in host
    memory (at most ``host_memory``, default half of this machine's RAM) or, for inference, on disk
    (``perf/cuts.py``). ``print(plan)`` shows the stages, their tiers and the bytes they move per step.
    ``compile``: predict the tiles compiled (``bp.tiled(model, compile=True)``): memory-bound chains
    fused by inductor (``perf.compiled``'s assumption); the tile is chosen as for eager tiles.
    """
    if memory is not None and tile is not None and tile != "auto":
        raise TypeError(
            f"make_plan got tile={tile!r} and memory={memory!r}: give one, tile= for a tile of your "
            "choice, memory= for the fastest one the planner predicts to fit."
        )
    dev = resolve_device(device)  # an unknown name fails here, listing the known ones
    gm = capture(model, multipass, [(tuple(input_shape), model_dtype(model), torch.device("cpu"))])
    if cuts is not None:  # stages cut at chosen nodes, kept in a slower tier (perf/cuts.py)
        shapes = [(tuple(input_shape), model_dtype(gm), torch.device("cpu"))]
        plan = staged_plan(gm, shapes, tile, memory, dev, dtype, training, multipass, cuts, host_memory)
    elif devices > 1 and (tile is None or tile == "auto" or memory is not None):
        return _plan_on_devices(gm, input_shape, dtype, dev, multipass, training, memory, tile, devices,
                                nodes, compile)  # fmt: skip
    elif tile is None or tile == "auto" or memory is not None:
        budget = default_budget(dev) if memory is None else memory
        plan = choose_tile(gm, input_shape, budget, dev, dtype, training, multipass).plan
        plan = plan if memory is not None else with_reason(plan, budget_reason(dev, tile))
    else:
        shapes = [(tuple(input_shape), model_dtype(gm), torch.device("cpu"))]
        plan = for_run(plan_graph(gm, shapes, tile, multipass), dtype, dev, training)
    plan = compiled_plan(plan) if compile else plan
    return plan if devices == 1 and nodes is None else with_devices(plan, devices, nodes)


def _plan_on_devices(
    gm, input_shape, dtype, dev, multipass, training, memory, tile, devices, nodes, compile=False
) -> Plan:
    """The plan of the tile whose step on ``devices`` ranks is predicted fastest under each device's
    memory (``multi.best_on_devices``); with ``compile``, that tile's step predicted compiled."""
    splits = analyse(gm, input_shape, multipass)
    budget = parse_memory(default_budget(dev) if memory is None else memory)
    check_budget(splits[-1], dtype, training, budget)  # global stages no tile size changes
    bound = partial(least_time, splits, input_shape, dtype, device=dev, training=training)
    tiles = candidates(splits, input_shape)
    p = best_on_devices(splits, input_shape, budget, dev, dtype, training, devices, nodes, tiles, bound)
    if memory is None:
        p = replace(p, single=p.single.with_note(f"{budget_reason(dev, tile)}; {p.single.note}"))
    plan = for_run(plan_splits(splits, input_shape, model_dtype(gm), p.tile), dtype, dev, training, p.single)
    if compile:
        return with_devices(compiled_plan(plan), devices, nodes)
    return with_devices(plan, devices, nodes, prediction=p)


def staged_plan(
    gm, inputs, tile, memory, dev, dtype, training, multipass, cuts, host_memory, agree=None
) -> Plan:
    """The plan of ``gm`` cut into stages at ``cuts`` (``perf.cuts.cut_splits``), its tile the one
    given or the planner's for ``memory`` (default: the device's). ``agree``: with ranks sharing the
    tiles (``engine.distributed.from_rank_zero``), every rank takes rank 0's cuts and tiles: ranks
    choosing on their own (each its own clock, calibration or free memory) could cut differently."""
    budget = parse_memory(memory) if memory is not None else default_budget(dev)
    host = host_budget(host_memory, parse_memory)
    tile = None if tile == "auto" else tile
    shape = tuple(inputs[0][0])

    def choose():
        return cut_splits(gm, inputs, tile, cuts, dev, dtype, training, budget, host, multipass, best_tile)

    if agree is None:
        splits, _, tile, note = choose()
    else:  # rank 0's choice (names, tiers and tiles travel; the graphs are cut again here)
        at, tile, note = agree(lambda: choose()[1:])
        splits = split_graph(gm, inputs, multipass, at)
    return replace(for_run(plan_splits(splits, shape, inputs[0][1], tile), dtype, dev, training), note=note)


CPU_MEMORY_SHARE = 0.5  # of the machine's RAM: the rest stays for the OS, the input and the caller's tensors


def default_budget(dev: Device) -> int:
    """The memory the planner fills when none is given: a GPU's own; half of the CPU's (its RAM,
    or the container's limit), since the input, the caller's tensors and the OS live there too."""
    return dev.memory_bytes if dev.name != "cpu" else int(CPU_MEMORY_SHARE * dev.memory_bytes)


def budget_reason(dev: Device, tile=None) -> str:
    """Why the planner chose with ``default_budget``, for ``plan.note``."""
    given = "tile='auto'" if tile == "auto" else "no tile= or memory= given"
    if dev.name == "cpu":
        return f"{given}: the planner's tile for half of this machine's {_size(dev.memory_bytes)}"
    return f"{given}: the planner's tile for the {_size(dev.memory_bytes)} of {dev.name}"


def with_reason(plan: Plan, reason: str) -> Plan:
    """``plan`` with ``reason`` before the planner's own note (in ``print(plan)``)."""
    note = f"{reason}; {plan.prediction.note}" if plan.prediction.note else reason
    return for_run(plan, None, plan.device, plan.training, plan.prediction.with_note(note))


def least_time(
    splits: list[Split], input_shape, dtype: torch.dtype, tile, device="cpu", training: bool = False,
    shared: dict | None = None,
) -> float:  # fmt: skip
    """A lower bound of ``predict_splits(...).time`` from the number of tiles alone (``bound.engine_bound``
    of each pass): nothing is walked, so the planner skips, for the cost of a multiplication, the tiles
    this already shows slower than its best. ``shared``: the search's (``predict_splits``'s), whose
    rates it reads."""
    rates = _setting(device, dtype, None, shared)[1]
    return sum(engine_bound(s, layout(s, input_shape, tile), rates, training) for s in splits)


def _size_up(n: int) -> str:
    """``n`` bytes as ``_size`` writes them, rounded up: a budget of that size fits ``n``."""
    for scale in (2**30, 2**20, 2**10):
        if n >= scale:
            return _size(math.ceil(100 * n / scale) * scale / 100)
    return _size(n)


def _side(tile: tuple[int, ...]) -> str:
    return " x ".join(map(str, tile))
