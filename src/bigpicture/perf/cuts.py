"""The planner's cuts: where to cut the network into stages kept in a slower tier, for the least
predicted time under the device's memory and the host's (``engine/cuts.py`` makes them exact).

A small tile of a deep network recomputes most of its halo: every layer's output is computed on
the tile grown by the receptive field of the layers after it. A cut at a node keeps its whole value
in host memory (or on disk, for inference) and the later layers tile it with their own halo only.
What it costs: the value's bytes in the tier, and moving them over the host link (PCIe, NVLink-C2C:
``devices.HOST_LINKS``) once written and once read per tile crop (``stage_cost.with_cuts``).

    candidates  one *frontier* per resolution: the fewest bytes of values that are live across a
                point of the network's order (a chain's output; in a U-Net the skips too)
    search      each candidate alone, predicted; then, best first, each kept if it lowers the
                predicted time of the cuts kept so far; every prediction within both budgets

The candidates are few (one per resolution, 5-12 in the census' networks) so the search costs
about two predictions per candidate.
"""

from __future__ import annotations

import math

import torch

from bigpicture.engine import capture as g
from bigpicture.engine import cuts as cutting
from bigpicture.engine.held import check_training, is_hold
from bigpicture.engine.plan import PerPass, split_graph
from bigpicture.engine.split import Split, split, stages
from bigpicture.engine.stages import grid, is_source, size
from bigpicture.engine.tiles import layout, per_dim_tile
from bigpicture.errors import TilingError
from bigpicture.perf.devices import Device, get_device
from bigpicture.perf.predict import predict_splits
from bigpicture.perf.stage_cost import host_bytes

HOST_SHARE = 0.5  # host_memory= not given: half of this machine's RAM (the rest: the OS, the input...)


def host_budget(host_memory, parse) -> int:
    """Bytes of host memory the cuts may take: ``host_memory`` (parsed by ``parse``), else half of
    this machine's RAM."""
    if host_memory is not None:
        return parse(host_memory)
    return int(HOST_SHARE * get_device("cpu").memory_bytes)


def cut_splits(gm, inputs, tile, cuts, dev: Device, dtype, training, budget, host, multipass, best_tile):
    """``(splits, tile, note)``: the passes of ``gm`` cut at ``cuts`` (node names, a mapping of them
    to tiers, or ``"auto"``: the planner's) for tiles of ``tile`` (None: the planner's, by
    ``best_tile(splits, shape, budget, dev, dtype, training)``, a ``schedule`` callback).
    ``host``: bytes of host memory the cuts may hold."""
    shape = tuple(inputs[0][0])
    if cuts != "auto":
        splits = split_graph(gm, inputs, multipass, cuts)
        if training:
            check_training(splits[-1])
        check_host(splits, shape, dtype, training, dev, host)
        if tile is None:
            best = best_tile(splits, shape, budget, dev, dtype, training)
            return splits, best.tile, best.note
        return splits, tile, f"cut at {', '.join(f'`{c}`' for c in cuts)} as asked"
    base, given = split_graph(gm, inputs, multipass), tile is not None
    if not given:
        tile = best_tile(base, shape, budget, dev, dtype, training).tile
    chosen, note = choose(gm, inputs, tile, dev, dtype, training, budget, host, multipass)
    splits = split_graph(gm, inputs, multipass, chosen) if chosen else base
    if chosen and not given:  # the planner's tile again, now that the stages are smaller
        best = best_tile(splits, shape, budget, dev, dtype, training)
        if best.time < predict_splits(splits, shape, dtype, tile, dev, training).time:
            tile, note = best.tile, f"{note}; {best.note}"
    if chosen:
        tile, note = stage_tiles(splits, shape, dtype, tile, dev, training, budget, note)
    return splits, tile, note


def stage_tiles(splits, shape, dtype, tile, dev: Device, training: bool, budget, note: str):
    """``(tile, note)``: ``tile`` for the first pass (the one asked, or the planner's) and, for each
    later one, the tile (``tile`` x 2^j, up to the image) with the least predicted time of that pass
    whose predicted memory fits ``budget`` (the device's, or ``memory=``). A later stage, coarser and
    with a smaller halo, then runs fewer, larger tiles; kept only if the whole plan is predicted
    faster and within the budget."""
    spatial = tuple(shape[2:])
    first = per_dim_tile(tile, len(spatial))
    uniform = predict_splits(splits, shape, dtype, first, dev, training)
    limit = budget if budget is not None else uniform.memory
    tiles = [first]
    for s in splits[1:]:
        best, pick, side = predict_splits([s], shape, dtype, first, dev, training), first, first
        while any(c < n for c, n in zip(side, spatial)):
            side = tuple(min(2 * c, n) for c, n in zip(side, spatial))
            p = predict_splits([s], shape, dtype, side, dev, training)
            if p.memory <= limit and p.time < best.time:
                best, pick = p, side
        tiles.append(pick)
    if len(set(tiles)) == 1:
        return tile, note
    each = PerPass(tiles)
    p = predict_splits(splits, shape, dtype, each, dev, training)
    if p.memory > limit or p.time >= uniform.time:
        return tile, note
    sides = ", ".join(" x ".join(map(str, t)) for t in tiles)
    return each, f"{note}; each stage its own tile ({sides}): {uniform.time:.3g} s -> {p.time:.3g} s"


def choose(gm, inputs, tile, dev: Device, dtype, training: bool, budget, host: int, multipass: bool):
    """``(cuts, note)``: the cuts (node name -> tier) with the least predicted time at ``tile``."""
    shape = tuple(inputs[0][0])
    values = g.propagate(gm, inputs)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    whole = split(gm, values, x, multipass)
    if whole.gm is not gm:  # the split rewrote the graph (a global stage held whole, a folded shuffle)
        return {}, "no cut: the planner does not yet choose cuts where the split rewrites the graph"
    # the first tier that fits is the fastest: a GPU's own memory, then the host's, then (inference) disk
    tiers = (("device",) if dev.name != "cpu" else ()) + ("host",) + (() if training else ("zarr",))
    keep: list = []  # the splits predicted: their ids key the shared memo, so they stay alive

    def evaluate(names: tuple) -> tuple[float, dict] | None:
        for tier in tiers:
            at = dict.fromkeys(names, tier)
            splits = stages(split(*_cut(gm, values, x, at), multipass))
            keep.append(splits)
            p = predict_splits(splits, shape, dtype, tile, dev, training)
            rows = cutting.traffic([(s, layout(s, shape, tile)) for s in splits], _item(dtype), training)
            fits = budget is None or p.memory <= budget
            if fits and host_bytes(rows, training) <= host:
                return p.time, at
        return None

    before = predict_splits(stages(whole), shape, dtype, tile, dev, training)
    singles = []
    for frontier in frontiers(whole, values, _item(dtype)):
        found = evaluate(frontier)
        if found is not None and found[0] < before.time:
            singles.append((found[0], frontier))
    chosen, best, at = (), before.time, {}
    for _, frontier in sorted(singles):
        names = tuple(dict.fromkeys(chosen + frontier))
        found = evaluate(names)
        if found is not None and found[0] < best:
            chosen, (best, at) = names, found
    if not at:
        return {}, f"no cut predicted faster ({len(singles)} candidate cuts alone were)"
    where = ", ".join(f"`{n}` ({t})" for n, t in at.items())
    return at, (f"cut at {where}: predicted {_pct(before.time, best)} the time of no cut "
                f"({before.time:.3g} s -> {best:.3g} s)")  # fmt: skip


def _cut(gm, values, x, at):
    """``(gm, values, x)`` of ``gm`` cut at ``at``, the values carried over (no propagation)."""
    new = cutting.cut(gm, at)
    old = {n.name: n for n in gm.graph.nodes}
    out = {}
    for n in new.graph.nodes:
        if n.name in old and old[n.name] in values:
            out[n] = values[old[n.name]]
        elif n.op == "call_function":  # a hold or a source: the cut node's value
            out[n] = out[n.args[0]]
    return new, out, next(n for n in new.graph.nodes if n.name == x.name)


def frontiers(whole: Split, values: dict, item: int) -> list[tuple[str, ...]]:
    """Per resolution (the stride of the last node before the cut), the set of tiled values live
    across one point of the order with the fewest bytes: cutting them all separates the stages."""
    nodes = [n for n in whole.gm.graph.nodes if whole.roles.get(n) == "spatial" and not is_source(n)]
    pos = {n: i for i, n in enumerate(nodes)}
    last = {n: max((pos[u] for u in n.users if u in pos), default=-1) for n in nodes}
    x, best = values[whole.input], {}
    for i, node in enumerate(nodes[:-1]):
        live = [n for n in nodes[: i + 1] if last[n] > i and n is not whole.input]
        if not live or not all(grid(values[n], x) for n in live):
            continue
        nbytes = sum(math.prod(values[n].shape) for n in live) * item
        key = whole.strides[node]
        if key not in best or nbytes <= best[key][0]:
            best[key] = (nbytes, tuple(n.name for n in live))
    return list(dict.fromkeys(names for _, names in best.values()))


def check_host(splits, shape, dtype, training: bool, dev: Device, host: int) -> None:
    """A ``TilingError`` when the cuts' whole tensors exceed the host memory budget."""
    rows = _held_rows(splits, dtype)
    need = host_bytes(rows, training)
    if need <= host:
        return
    grads = " and their gradients" if training else ""
    listed = "; ".join(f"`{r.node}` {r.shape} {size(r.held)}" for r in rows if r.tier == "host")
    raise TilingError(
        f"cuts: the whole tensors kept in host memory{grads} need {size(need)}, more than host_memory= "
        f"{size(host)} ({listed}). Give host_memory= of at least {size(need)}, cut at fewer or smaller "
        "nodes (deeper ones hold fewer bytes), use a smaller dtype, or for inference keep them in the "
        "zarr tier (cuts={name: 'zarr'})."
    )


def _held_rows(splits, dtype) -> list:
    """The cuts' held bytes and tiers (traffic aside: no tile is needed for them)."""
    item, rows = _item(dtype), {}
    for s in splits:
        for source in (n for n in s.order if is_source(n) and is_hold(n.args[0])):
            hold, shape = source.args[0], tuple(s.shapes[source])
            rows[hold] = cutting.Traffic(hold.args[0].name, shape, hold.kwargs.get("tier", "host"),
                                         math.prod(shape) * item, 0)  # fmt: skip
    return list(rows.values())


def _item(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _pct(before: float, after: float) -> str:
    return f"{100 * after / before:.0f}%" if before else "100%"


