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
from bigpicture.engine.plan import PerPass, split_graph, tile_of
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
    """``(splits, at, tile, note)``: the passes of ``gm`` cut at ``at`` (``cuts`` as given: node names
    or a mapping of them to tiers; for ``"auto"``, the planner's mapping) for tiles of ``tile``
    (None: the planner's, by
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
            tile, note = best.tile, best.note
        else:
            note = f"cut at {', '.join(f'`{c}`' for c in cuts)} as asked"
        return (splits, cuts, *kept_graphs(splits, shape, dtype, tile, dev, training, budget, note))
    base, given = split_graph(gm, inputs, multipass), tile is not None
    if not given:
        tile = best_tile(base, shape, budget, dev, dtype, training).tile
    search = Search(gm, inputs, dev, dtype, training, budget, host, multipass)
    chosen, note = search.choose(tile)
    splits = split_graph(gm, inputs, multipass, chosen) if chosen else base
    if chosen and not given:  # the planner's tile again, now that the stages are smaller
        best = best_tile(splits, shape, budget, dev, dtype, training)
        if best.time < predict_splits(splits, shape, dtype, tile, dev, training).time:
            tile, note = best.tile, f"{note}; {best.note}"
    if chosen:
        tile, note = stage_tiles(splits, shape, dtype, tile, dev, training, budget, note)
        more = search.more(chosen, tile) if isinstance(tile, PerPass) else None
        if more is not None:
            chosen, splits = more[0], split_graph(gm, inputs, multipass, more[0])
            tile, note = stage_tiles(splits, shape, dtype, tile_of(tile, 0), dev, training, budget,
                                     f"{note}; then {more[1]}")
    return splits, chosen, *kept_graphs(splits, shape, dtype, tile, dev, training, budget, note)


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
    if len(set(tiles)) > 1:
        each = PerPass(tiles)
        p = predict_splits(splits, shape, dtype, each, dev, training)
        if p.memory <= limit and p.time < uniform.time:
            sides = ", ".join(" x ".join(map(str, t)) for t in tiles)
            tile = each
            note = f"{note}; each stage its own tile ({sides}): {uniform.time:.3g} s -> {p.time:.3g} s"
    return kept_graphs(splits, shape, dtype, tile, dev, training, limit, note)


def kept_graphs(splits, shape, dtype, tile, dev: Device, training: bool, limit, note: str):
    """``(tile, note)``, in training with every earlier pass keeping its last tile's graph from the
    forward to the backward (``Plan.keep_graph``), where all the passes' predicted peaks together fit
    ``limit``: no recompute of those tiles, which for a later stage of one large tile is its whole
    forward. An upper bound: the graphs kept at once are at most every pass's peak."""
    if not training or len(splits) < 2 or limit is None:
        return tile, note
    tiles = [tile_of(tile, k) for k in range(len(splits))]
    held = sum(predict_splits([s], shape, dtype, t, dev, training).memory for s, t in zip(splits, tiles))
    if held > limit:
        return tile, note
    keep = range(len(splits) - 1)
    return PerPass(tiles, keep), f"{note}; each pass keeps its last tile's graph ({size(held)} at most)"


class Search:
    """The cuts' search over one network and input (``choose``, then ``more``), its candidates and
    predictions shared."""

    def __init__(self, gm, inputs, dev: Device, dtype, training: bool, budget, host: int, multipass: bool):
        self.gm, self.shape, self.dev, self.dtype = gm, tuple(inputs[0][0]), dev, dtype
        self.training, self.budget, self.host, self.multipass = training, budget, host, multipass
        self.values = g.propagate(gm, inputs)
        self.x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        self.whole = split(gm, self.values, self.x, multipass)
        # the first tier that fits is the fastest: a GPU's own memory, then the host's, then (inference) disk
        self.tiers = (("device",) if dev.name != "cpu" else ()) + ("host",) + (() if training else ("zarr",))
        self.keep: list = []  # the splits predicted: their ids key the shared memo, so they stay alive
        self.candidates: list = []  # the frontiers, those predicted faster alone first

    def evaluate(self, names: tuple, tile, tiers=None) -> tuple[float, dict] | None:
        """(predicted time, cuts) at the first of ``tiers`` where ``names`` cut fit both budgets."""
        for tier in tiers or self.tiers:
            at = dict.fromkeys(names, tier)
            splits = stages(split(*_cut(self.gm, self.values, self.x, at), self.multipass))
            self.keep.append(splits)
            if isinstance(tile, PerPass):  # the later stages' tile for every stage after the first
                tile = PerPass([tile[0]] + [tile[-1]] * (len(splits) - 1))
            p = predict_splits(splits, self.shape, self.dtype, tile, self.dev, self.training)
            passes = [(s, layout(s, self.shape, tile_of(tile, k))) for k, s in enumerate(splits)]
            rows = cutting.traffic(passes, _item(self.dtype), self.training)
            fits = self.budget is None or p.memory <= self.budget
            if fits and host_bytes(rows, self.training) <= self.host:
                return p.time, at
        return None

    def choose(self, tile) -> tuple[dict, str]:
        """``(cuts, note)``: the cuts (node name -> tier) with the least predicted time at ``tile``."""
        if self.whole.gm is not self.gm:  # the split rewrote the graph (a global stage, a folded shuffle)
            return {}, "no cut: the planner does not yet choose cuts where the split rewrites the graph"
        shape, dtype = self.shape, self.dtype
        before = predict_splits(stages(self.whole), shape, dtype, tile, self.dev, self.training)
        singles, rest = [], []
        for frontier in frontiers(self.whole, self.values, _item(dtype)):
            found = self.evaluate(frontier, tile)
            if found is not None and found[0] < before.time:
                singles.append((found[0], frontier))
            else:
                rest.append(frontier)
        self.candidates = [f for _, f in sorted(singles)] + rest
        chosen, best, at = (), before.time, {}
        for _, frontier in sorted(singles):
            names = tuple(dict.fromkeys(chosen + frontier))
            found = self.evaluate(names, tile)
            if found is not None and found[0] < best:
                chosen, (best, at) = names, found
        if not at:
            return {}, f"no cut predicted faster ({len(singles)} candidate cuts alone were)"
        where = ", ".join(f"`{n}` ({t})" for n, t in at.items())
        return at, (f"cut at {where}: predicted {_pct(before.time, best)} the time of no cut "
                    f"({before.time:.3g} s -> {best:.3g} s)")  # fmt: skip

    def more(self, at: dict, tile: PerPass) -> tuple[dict, str] | None:
        """``(cuts, note)`` with more cuts, or None: once the later stages take their own, larger
        tiles, a cut the search at one tile passed over may pay (an early, large one that leaves the
        first stage only its first layers). Each other candidate, in the search's order, is kept
        where it lowers the predicted time with every later stage at the last stage's tile."""
        chosen = tuple(at)
        tiers = tuple(dict.fromkeys(at.values()))
        found = self.evaluate(chosen, tile, tiers)
        if found is None:
            return None
        best, added = found[0], []
        for frontier in self.candidates:
            names = tuple(dict.fromkeys(chosen + frontier))
            if names == chosen:
                continue
            found = self.evaluate(names, tile, tiers)
            if found is not None and found[0] < best:
                chosen, (best, at), added = names, found, added + [n for n in frontier if n not in chosen]
        if not added:
            return None
        return at, f"cut at {', '.join(f'`{n}`' for n in added)} too: predicted {best:.3g} s"


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


