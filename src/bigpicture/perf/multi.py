"""Several devices: each tile's predicted cost, the ranks' shares, and the step on N devices.

``tile_costs(plan)`` is what ``bp.tiled(model, group=...)`` hands the engine's ``Team``: the
predicted seconds of every tile, from one walk per geometry (tiles of the same geometry --
interior, edge, corner -- cost the same; ``steps.walk`` is memoised per node box), so the ranks'
contiguous shares are balanced by time rather than by count.

``predict_devices`` predicts one step of a plan whose tiles are shared by N ranks, as the engine
runs it (``engine.distributed``):

    time = slowest rank's share of the one-device time      (shares by predicted tile cost)
         + per pass: a sum all-reduce of the dense outputs the tail needs,
                     an all-gather of the streamed reductions' partial results
         + training, per pass: one all-reduce of the parameter gradients, in float64

Collectives are not overlapped with compute (the engine combines after its last tile). An
all-reduce of B bytes over n ranks is a ring: 2 (n-1)/n B / bandwidth + 2 (n-1) latency; over
m nodes of g devices it is hierarchical (NCCL's tree/ring within and across nodes): within the
node as before, then 2 (m-1)/m (B/g) over each device's own network adapter. Links reach
``LINK_EFFICIENCY`` of their specified bandwidth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from bigpicture.engine.distributed import shares
from bigpicture.engine.plan import Plan, plan_splits
from bigpicture.errors import TilingError
from bigpicture.perf.comm import LINK_EFFICIENCY, all_reduce_s, communication  # noqa: F401 (re-exported)
from bigpicture.perf.devices import NODE_LINKS, Interconnect, get_interconnect
from bigpicture.perf.grid import Geometry, _dim_keys
from bigpicture.perf.predict import (
    Prediction,
    _seconds,
    _setting,
    _size,
    least_memory,
    model_dtype,
    predict,
    predict_splits,
    resolve_device,
)
from bigpicture.perf.walk import walk

DEVICES_PER_NODE = 8  # the default node: 8 GPUs, as in NVIDIA DGX/HGX systems


def tile_costs(plan: Plan, shared: dict | None = None) -> list[float]:
    """Predicted seconds of each of ``plan.tiles`` (forward, plus backward for a training plan).

    A plan whose device the model cannot predict (no table entry) is weighed by read-box size.
    ``shared``: the planner's (``predict_splits``'s), whose rates it reads.
    """
    try:
        dev = resolve_device(plan.device)
    except TilingError:
        return [float(t.read.numel) for t in plan.tiles]
    dtype = plan.dtype if plan.dtype.is_floating_point else model_dtype(plan.split.gm)
    rates = _setting(dev, dtype, None, shared)[1]
    memo, by_class, costs = {}, {}, []
    tiles, kinds = plan.tiles, _kinds(plan)
    for p in tiles.positions:
        index = tiles.index(p)
        key = tuple(kinds[d][j] for d, j in enumerate(index)) if kinds else None
        if key is None or key not in by_class:
            tile = tiles.tile(index)
            need = plan.needs(tile)
            w = walk(plan.split, need, tile.writes, dtype, rates, plan.training, memo=memo)
            engine = w.nodes * (rates.train_node_s if plan.training else rates.node_s)
            cost = w.fwd_s + (w.fwd_s + w.bwd_s if plan.training else 0.0) + engine
            by_class[key if key is not None else ("tile", p)] = cost
        costs.append(by_class[key if key is not None else ("tile", p)])
    return costs


def _kinds(plan: Plan) -> list | None:
    """Per dimension, each grid index's kind (``grid._dim_keys``: tiles of one kind in every dimension
    cost the same), so a grid of 10^4 tiles is walked once per kind, not per tile; None where the
    grid's boxes are not a product per dimension (each tile is then walked)."""
    tiles = plan.tiles
    if not tiles.walked.separable:
        return None
    geometry = Geometry(plan.split, tiles.diagonal)
    return [_dim_keys(plan.split, tiles.lay, geometry, d) for d in range(plan.split.nd)]


@dataclass(frozen=True)
class DevicesPrediction:
    """One step on ``devices`` ranks sharing each image's tiles: per-rank shares and communication."""

    single: Prediction  # the same plan on one device
    devices: int
    nodes: int
    links: tuple[Interconnect, Interconnect]  # within a node, between nodes
    shares: tuple[float, ...]  # each rank's predicted compute seconds
    communication: tuple[tuple[str, float], ...]  # collective -> seconds
    gradient_bytes: int  # the float64 buffer the gradients are summed in

    @property
    def time(self) -> float:
        return max(self.shares) + sum(s for _, s in self.communication)

    @property
    def memory(self) -> int:
        """Per device: the one-device peak, plus the gradient buffer of the all-reduce."""
        return self.single.memory + self.gradient_bytes

    @property
    def flops(self) -> int:
        return self.single.flops

    @property
    def tile(self):
        return self.single.tile

    @property
    def tiles(self) -> int:
        return self.single.tiles

    @property
    def halo_overhead(self) -> float:
        return self.single.halo_overhead

    @property
    def summary(self) -> str:
        talk = sum(s for _, s in self.communication)
        return (
            f"{self.speedup:.2f}x one device, imbalance {self.imbalance:.3f}, communication {_seconds(talk)}"
        )

    @property
    def imbalance(self) -> float:
        return max(self.shares) / (sum(self.shares) / len(self.shares))

    @property
    def speedup(self) -> float:
        return self.single.time / self.time

    def rows(self) -> list[tuple[str, str]]:
        rows = self.single.rows()
        link = (
            self.links[0].name
            if self.nodes == 1
            else f"{self.links[0].name} within, {self.links[1].name} between"
        )
        talk = ", ".join(f"{k} {_seconds(v)}" for k, v in self.communication if v)
        rows[0:0] = [
            ("devices", f"{self.devices} x {self.single.device} on {self.nodes} node(s); {link}"),
            ("step", f"{_seconds(self.time)}: {self.speedup:.2f}x one device ({_seconds(self.single.time)})"),
            ("per rank", f"{_seconds(max(self.shares))} slowest share, imbalance {self.imbalance:.3f}"),
            ("communication", talk or "none"),
            (
                "per device memory",
                f"{_size(self.memory)} (one device's + {_size(self.gradient_bytes)} all-reduce buffer)",
            ),
        ]
        links = "; ".join(f"{x.name}: {x.source}" for x in dict.fromkeys(self.links[: 1 + (self.nodes > 1)]))
        rows.append(("links", f"{links}; {100 * LINK_EFFICIENCY:.0f}% of their bandwidth, latencies assumed"))
        return rows

    def __str__(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def predict_devices(
    plan: Plan,
    devices: int,
    nodes: int | None = None,
    links=None,
    single: Prediction | None = None,
    costs: list[float] | None = None,
    shared: dict | None = None,
) -> DevicesPrediction:
    """``plan`` run by ``devices`` ranks (``nodes`` nodes, default 8 devices per node).

    ``links``: (within a node, between nodes), names or ``Interconnect``s; default the device's
    own (``devices.NODE_LINKS``). ``single``, ``costs``: the plan's one-device prediction and
    ``tile_costs``, if known already; ``shared``: the planner's, whose rates ``tile_costs`` reads.
    """
    if devices < 1:
        raise TilingError(f"devices={devices}: give the number of devices, 1 or more")
    nodes = nodes or math.ceil(devices / DEVICES_PER_NODE)
    if devices % nodes:
        raise TilingError(f"devices={devices} on nodes={nodes}: give the same number of devices per node")
    single = single or predict(plan)
    links = tuple(map(get_interconnect, links)) if links else _links(single.device)
    costs = tile_costs(plan, shared) if costs is None else costs
    total = sum(costs) or 1.0
    per_rank = tuple(single.time * sum(costs[i] for i in r) / total for r in shares(costs, devices))
    talk, buffer = communication(plan, devices, nodes, links)
    return DevicesPrediction(single, devices, nodes, links, per_rank, talk, buffer)


def with_devices(
    plan: Plan,
    devices: int,
    nodes: int | None = None,
    links=None,
    prediction: DevicesPrediction | None = None,
) -> Plan:
    """``plan`` whose prediction is for ``devices`` ranks sharing its tiles (``predict_devices``),
    or is ``prediction`` if known already."""
    single = plan.predictor

    def predictor(p: Plan) -> DevicesPrediction:
        base = replace(p, predictor=single)
        return predict_devices(base, devices, nodes, links, single(base) if single else None)

    plan = replace(plan, predictor=predictor)
    if prediction is not None:
        plan.__dict__["prediction"] = prediction  # the slot of Plan.prediction (a cached_property)
    return plan


def best_on_devices(
    splits: list, input_shape, budget: int, dev, dtype, training: bool, devices: int, nodes, tiles, time_bound
) -> DevicesPrediction:
    """Of ``tiles`` (candidate shapes), the one whose step on ``devices`` ranks is predicted fastest
    with each device's peak (one device's plus the gradient buffer) within ``budget`` bytes; its
    ``single.note`` says why, against the tile that is fastest on one device.

    The two differ: the step is the slowest rank's contiguous share, and with few tiles per rank a
    tile more or less decides it (169 tiles on 64 ranks: 2 or 3 each), so a smaller tile that
    costs more halo work on one device can be faster on N. From the largest tile down, a candidate
    is skipped once a lower bound of its N-device time reaches the best so far: ``time_bound``
    (a bound of its one-device time), then its one-device prediction, over N (perfect balance),
    plus the communication (no tile changes it: dense outputs and gradients have the image's and
    the model's sizes). ``time_bound(tile, shared=)``: seconds, from ``schedule.least_time``.
    """
    best, fitting, shared, talk, least, skipped = None, {}, {}, None, None, 0
    nodes, links, gm = nodes or math.ceil(devices / DEVICES_PER_NODE), _links(dev.name), splits[-1].gm
    for tile in reversed(tiles):
        bound = 0.0 if talk is None else sum(s for _, s in talk[0])
        if best is not None and time_bound(tile, shared=shared) / devices + bound >= best.time:
            skipped += 1
            continue
        if least_memory(splits, input_shape, dtype, tile, dev, training, shared=shared) > budget:
            continue
        single = predict_splits(splits, input_shape, dtype, tile, dev, training, shared=shared)
        plan = _for_devices(plan_splits(splits, input_shape, model_dtype(gm), tile), dev, dtype, training)
        talk = talk or communication(plan, devices, nodes, links)
        least = single.memory + talk[1] if least is None else min(least, single.memory + talk[1])
        if single.memory + talk[1] > budget:
            continue
        if best is not None and single.time / devices + sum(s for _, s in talk[0]) >= best.time:
            fitting[tile] = None  # fits; predicted no faster
            continue
        fitting[tile] = predict_devices(plan, devices, nodes, links, single=single, shared=shared)
        best = fitting[tile] if best is None or fitting[tile].time < best.time else best
    if best is None:
        raise TilingError(
            f"no tile fits {_size(budget)} per device on {devices} x {dev.name}: the least predicted is "
            f"{_size(least) if least is not None else 'over the budget for every tile'} (one device's peak "
            "plus the float64 buffer the gradients are all-reduced in). Give more memory= or a smaller dtype."
        )
    return _noted(best, fitting, budget, skipped)


def _noted(best: DevicesPrediction, fitting: dict, budget: int, skipped: int) -> DevicesPrediction:
    """``best`` with a note saying why: the tile sizes weighed, and the one-device choice's step."""
    done = [p for p in fitting.values() if p is not None]
    one = min(done, key=lambda p: (p.single.time, -math.prod(p.tile)))
    note = (
        f"fastest predicted step on {best.devices} devices (shares by predicted tile cost) of the tile "
        f"sizes that fit {_size(budget)} per device: {len(done)} predicted on {best.devices}, "
        f"{len(fitting) - len(done) + skipped} more bounded slower"
    )
    if one is not best:
        note += (
            f"; the fastest on one device, {_side(one.tile)} ({one.tiles} tiles), would take "
            f"{_seconds(one.time)} on {best.devices} (imbalance {one.imbalance:.2f})"
        )
    return replace(best, single=best.single.with_note(note))


def _for_devices(plan: Plan, dev, dtype, training: bool) -> Plan:
    run = dict(dtype=dtype, device=dev, training=training)
    return replace(plan, **run, earlier=tuple(replace(e, **run) for e in plan.earlier))


def _links(device: str) -> tuple[Interconnect, Interconnect]:
    """The device's own links (within a node, between nodes); PCIe and Ethernet when not listed."""
    within, between = NODE_LINKS.get(device, ("PCIe4", "Ethernet-100G"))
    return get_interconnect(within), get_interconnect(between)


def _side(tile) -> str:
    return " x ".join(map(str, tile))
