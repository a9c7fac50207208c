"""Tile and Plan: everything decided before the first tile runs.

    input   |......................................................|
    tile j          |----box----|            box: input pixels the tile owns
    read box      |rr|----box----|rr|        read: what it needs, halo included
    sink          |  write  |                write: the sink region it computes

The tile size is given in input pixels and rounded to a multiple of every sink's total
stride, so that each tile's write boxes are whole sink pixels and partition every sink; the
last tile in each dimension takes the remainder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch

from bigpicture.engine import capture as g
from bigpicture.engine import cuts as cutting
from bigpicture.engine import stages as staging
from bigpicture.engine.box import Box
from bigpicture.engine.check import checked_capture
from bigpicture.engine.regions import needs, receptive_field
from bigpicture.engine.rules.positions import rewrite_position_reductions
from bigpicture.engine.rules.stats import batch_moments, rewrite_global_norms
from bigpicture.engine.split import Split, keep_origins, split, stages
from bigpicture.engine.tiles import Tile, Tiles, layout
from bigpicture.errors import TilingError


@dataclass(frozen=True)
class Plan:
    """Everything decided before the first tile runs.

    ``prediction`` (and ``memory``, ``time``, ``flops``) is what the performance model predicts for
    running it on ``device``: the planner attaches a ``predictor`` (a function of the plan), and the
    engine itself never predicts."""

    split: Split
    input_shape: tuple[int, ...]
    dtype: torch.dtype  # of the run
    requested: tuple[int, ...]
    tile: tuple[int, ...]
    tiles: Sequence[Tile]  # ``tiles.Tiles``: made on demand, row-major over the grid
    earlier: tuple[Plan, ...] = ()  # passes before this one, for global ops (multipass=True)
    device: Any = "cpu"  # what the prediction is for: a device-table name, a devices.Device, a torch.device
    training: bool = False  # predict a training step (forward + backward), else one forward
    note: str = ""  # why this tile: the planner's reason, or why the fixed default was used
    # training: the forward keeps its last tile's graph for the backward, which then does not recompute
    # it (the last pass always does; an earlier pass's graph waits for its backward: the planner's call)
    keep_graph: bool = False

    predictor: Callable[[Plan], Any] | None = field(default=None, compare=False, repr=False)

    @cached_property
    def prediction(self):
        """Predicted peak memory and time (a ``bigpicture.perf.predict.Prediction``), on first use."""
        if self.predictor is None:
            raise TilingError(
                "this plan has no performance model attached: make it with bp.make_plan(...) or "
                "predict it with bp.predict(plan, device)."
            )
        return self.predictor(self)

    @property
    def memory(self) -> int:
        """Predicted peak memory in bytes."""
        return self.prediction.memory

    @property
    def time(self) -> float:
        """Predicted seconds: one forward, or for ``training`` one forward and backward."""
        return self.prediction.time

    @property
    def flops(self) -> int:
        """Predicted floating-point operations of the run (halo recompute included)."""
        return self.prediction.flops

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(math.ceil(n / t) for n, t in zip(self.input_shape[2:], self.tile))

    @property
    def sinks(self):
        return self.split.sinks

    def needs(self, tile: Tile) -> dict:
        return needs(self.split, dict(zip(self.split.sinks, tile.writes)))

    @property
    def halo(self) -> tuple[tuple[int, int], ...]:
        """Largest extra input read below and above a tile's own box, per spatial dimension."""
        nd = len(self.tile)
        if self.split.input not in self.split.order:  # a pass that reads only held tensors (cuts)
            return _held_halo(self)
        if getattr(self.tiles, "separable", False):  # the grid's diagonal has every dimension's boxes
            dims = [self.tiles.per_dim(d) for d in range(nd)]
            lo = [max((b[0] - r[0] for b, r, _ in dims[d]), default=0) for d in range(nd)]
            hi = [max((r[1] - b[1] for b, r, _ in dims[d]), default=0) for d in range(nd)]
            return tuple(zip(lo, hi))
        lo = [max((t.box.lo[d] - t.read.lo[d] for t in self.tiles), default=0) for d in range(nd)]
        hi = [max((t.read.hi[d] - t.box.hi[d] for t in self.tiles), default=0) for d in range(nd)]
        return tuple(zip(lo, hi))

    @property
    def receptive_field(self) -> tuple[int, ...]:
        return receptive_field(self.split)

    def lint(self) -> None:
        """Check that write boxes partition every sink and read boxes lie in the image. Once per
        plan, when a run first uses it (``execute.Runner``), not when it is made: the planner makes
        plans it never runs, and the check walks every row of the grid's diagonal (a second for a
        deep network at 32,768^2)."""
        if not self.__dict__.get("_linted"):
            self._lint()
            object.__setattr__(self, "_linted", True)

    def _lint(self) -> None:
        if getattr(self.tiles, "separable", False):  # per dimension: the tiles are a product
            return self._lint_per_dim()
        image = Box.from_shape(self.input_shape[2:])
        for t in self.tiles:
            assert image.contains(t.read), (t, image)
        for k, sink in enumerate(self.split.sinks):
            extent = self.split.extents[sink]
            total = sum(t.writes[k].numel for t in self.tiles)
            hull = Box.from_shape((0,) * len(extent))
            for t in self.tiles:
                hull = hull.hull(t.writes[k])
            assert total == math.prod(extent) and hull == Box.from_shape(extent), (sink, total, extent)

    def _lint_per_dim(self) -> None:
        for d, n in enumerate(self.input_shape[2:]):
            rows = self.tiles.per_dim(d)
            assert all(0 <= r[0] <= r[1] <= n for _, r, _ in rows), (d, rows)
            for k, sink in enumerate(self.split.sinks):
                ends = [w[k] for _, _, w in rows if w[k][1] > w[k][0]]
                extent = self.split.extents[sink][d]
                joined = all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
                assert joined and ends[0][0] == 0 and ends[-1][1] == extent, (sink, d, ends, extent)

    def __str__(self) -> str:
        s, roles = self.split, list(self.split.roles.values())
        rows = [
            ("input", f"{tuple(self.input_shape)} {str(self.dtype).replace('torch.', '')}"),
            (
                "split",
                f"{roles.count('spatial')} tiled nodes, {roles.count('reduce')} streamed reductions, "
                f"{roles.count('tail')} untiled nodes after them",
            ),  # fmt: skip
            ("tile", _tile_text(self)),
            ("grid", _grid_text(self)),
            ("halo", _halo_text(self)),
        ]
        if s.input in s.order:  # a pass that reads held tensors only has no input field of its own
            rows.append(("receptive field", " x ".join(map(str, self.receptive_field)) + " input px"))
        if self.earlier:
            rows.append(("passes", _passes_text(self) + _batchnorm_note(s)))
        if staging.sources(s):
            item = torch.empty((), dtype=self.dtype).element_size()
            rows.append(("global stages", staging.describe(s, item)))
        if staging.cut_sources(s):  # stages cut at chosen nodes, each kept in a tier
            rows.append(("cuts", "; ".join(map(str, cutting.plan_traffic(self)))))
        for p, stage in enumerate(self.earlier + (self,)):
            for k, sink in enumerate(stage.split.sinks):
                stride = "x".join(str(f) for f in s.strides[sink])
                kind = "reduced" if any(s.roles.get(u) == "reduce" for u in sink.users) else "dense"
                name = f"pass {p} sink {k}" if self.earlier else f"sink {k}"
                rows.append((name, f"`{sink.name}` {kind}, shape {s.extents[sink]}, stride {stride}"))
        try:
            predicted = [(k, v) for k, v in self.prediction.rows() if k != "tile"]
        except Exception as e:  # printing a plan must not fail for want of a prediction
            predicted = [("prediction", f"not available ({type(e).__name__}: {e})")]
        if self.note and all(k != "planner" for k, _ in predicted):  # why this tile, if not predicted
            predicted.insert(0, ("planner", self.note))
        for k, v in predicted:  # the planner's reason right after the tile it chose
            rows.insert(3 if k == "planner" else len(rows), ("predicted on" if k == "device" else k, v))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _halo_text(plan: Plan) -> str:
    """The halo of each pass: cuts give each its own (``engine/cuts.py``)."""
    # signed: a pass that crops (a slice of the map, say) reads less than its tile: "+4/+48"
    text = lambda p: ", ".join(f"{-a:+d}/{b:+d}" for a, b in p.halo)  # noqa: E731
    if not staging.cut_sources(plan.split):
        return text(plan) + " input px (below/above, per dim)"
    passes = (*plan.earlier, plan)
    tiles = len({p.tile for p in passes}) > 1  # each stage its own tile: say which
    return "; ".join(f"pass {k} {text(p)}" + (f" (tile {' x '.join(map(str, p.tile))})" if tiles else "")
                     for k, p in enumerate(passes)) + " input px (below/above, per dim)"  # fmt: skip


def _held_halo(plan: Plan) -> tuple[tuple[int, int], ...]:
    """The halo of a pass that reads only held tensors: what its tiles read of them beyond their
    own boxes, in input pixels (a held tensor's pixel is ``stride`` input pixels)."""
    s, lay = plan.split, plan.tiles.lay
    held = [n for n in s.order if staging.is_source(n)]
    out = []
    for d in range(len(plan.tile)):
        lo = hi = 0
        for j, (a, b) in enumerate(lay.intervals[d]):
            need = plan.tiles.diagonal.row(min(j, max(lay.grid) - 1))[1]
            for n in held:
                box, f = need[n], s.strides[n][d]
                if not box.empty:
                    lo, hi = max(lo, math.ceil(a - box.lo[d] * f)), max(hi, math.ceil(box.hi[d] * f - b))
        out.append((lo, hi))
    return tuple(out)


def _passes_text(plan: Plan) -> str:
    """How many passes over the tiles, and the global ops each later pass waits for."""
    why = "; ".join(f"pass {k} uses {', '.join(ops)}" for k, ops in sorted(plan.split.reasons.items()))
    return (f"{len(plan.earlier) + 1} over the tiles, for values of the whole image that later tiles use: "
            f"{why} (bp.tiled(..., multipass=False) makes them an error instead)")  # fmt: skip


def _batchnorm_note(s: Split) -> str:
    count = sum(n.target is batch_moments for n in s.gm.graph.nodes)
    if not count:
        return ""
    return (f" ({count} train-mode BatchNorm; with `bp.freeze_batchnorm(model)` they need no pass of "
            "their own)")  # fmt: skip


def _grid_text(plan: Plan) -> str:
    cells = math.prod(plan.grid)
    text = f"{' x '.join(map(str, plan.grid))} = "
    if cells == len(plan.tiles):
        return text + f"{cells} tiles"
    return text + f"{cells} cells, {len(plan.tiles)} tiles with work (the others write nothing)"


def _tile_text(plan: Plan) -> str:
    text = " x ".join(map(str, plan.tile)) + " input px"
    if plan.tile != plan.requested:
        text += f" (asked {' x '.join(map(str, plan.requested))}; rounded to a multiple of the total stride"
        text += " or capped at the image)"
    return text


def plan_for_split(s: Split, input_shape, dtype, tile) -> Plan:
    lay = layout(s, input_shape, tile)
    return Plan(s, tuple(input_shape), dtype, lay.requested, lay.tile, Tiles.of(s, lay))


class PerPass(tuple):
    """One tile per pass over the tiles: the stages of a cut network each tile on their own
    (a later stage, at a coarser resolution with a smaller halo, takes larger tiles). ``keep``: the
    indices of the earlier passes whose last tile's graph the forward keeps (``Plan.keep_graph``)."""

    def __new__(cls, tiles, keep=()):
        new = super().__new__(cls, tiles)
        new.keep = frozenset(keep)
        return new


def tile_of(tile, k: int):
    """The tile of pass ``k``: ``tile`` itself, or its k-th item when it is ``PerPass``."""
    return tile[k] if isinstance(tile, PerPass) else tile


def requested_tiles(plan: Plan):
    """The tile asked for each pass of ``plan``: one, or ``PerPass`` when they differ."""
    passes = (*plan.earlier, plan)
    asked, keep = [p.requested for p in passes], [k for k, p in enumerate(passes) if p.keep_graph]
    return plan.requested if len(set(asked)) == 1 and not keep else PerPass(asked, keep)


def plan_splits(splits: list[Split], input_shape, dtype, tile) -> Plan:
    """The plan of the passes of a split (``split.stages``), the last one holding the earlier ones;
    ``tile`` one for every pass or ``PerPass``."""
    plans = [plan_for_split(s, input_shape, dtype, tile_of(tile, k)) for k, s in enumerate(splits)]
    keep = getattr(tile, "keep", ())
    plans = [replace(p, keep_graph=True) if k in keep else p for k, p in enumerate(plans)]
    return replace(plans[-1], earlier=tuple(plans[:-1]))


def default_tile(nd: int) -> int:
    """The tile side when none is given: about a million input positions per tile in 1D, 2D and 3D
    (1024 x 1024 px; 128^3 voxels), large against most receptive fields and small in memory."""
    return {1: 2**20, 2: 1024, 3: 128}.get(nd, max(1, round(2 ** (20 / max(nd, 1)))))


def capture(model: torch.nn.Module, multipass: bool = True, inputs: list | None = None):
    """The model's graph; with ``inputs`` (as ``plan_graph`` takes them) checked against the model
    for them, and captured another way where torch.fx gets it wrong (``check.checked_capture``);
    reductions over all positions (attention pooling, logsumexp, top-k) rewritten to stream; with
    ``multipass``, global norms rewritten into statistics and a normalize."""
    gm = g.capture(model) if inputs is None else checked_capture(model, inputs)
    rewrite_position_reductions(gm)  # attention pooling, logsumexp, top-k over positions: streamed
    if multipass:
        keep_origins(gm, rewrite_global_norms)
    return gm


def plan_graph(gm, inputs: list, tile, multipass: bool = True, cuts=()) -> Plan:
    """Plan a captured graph for placeholder inputs given as (shape, dtype, device) or values.

    ``cuts``: node names (or a mapping of them to tiers) where the network is cut into stages
    (``engine/cuts.py``)."""
    shape, dtype, _ = inputs[0]
    if len(shape) < 3:
        raise TilingError(f"input shape {tuple(shape)} has no spatial dimension: expected (N, C, *spatial).")
    return plan_splits(split_graph(gm, inputs, multipass, cuts), shape, dtype, tile)


def split_graph(gm, inputs: list, multipass: bool = True, cuts=()) -> list[Split]:
    """The passes of a captured graph for these inputs, cut at ``cuts`` (checked) first."""
    gm = cutting.cut(gm, cuts or ())
    values = g.propagate(gm, inputs)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    cutting.check(gm, values, x)
    whole = split(gm, values, x, multipass)
    cutting.check(whole.gm, values, whole.input, whole.roles)
    return stages(whole)


@dataclass
class TileStats:
    """What the tiled forward and backward of one call did (``net.report`` after a call)."""

    tiles: int = 0
    computed: int = 0  # forward tile computations
    skipped: int = 0  # forward tiles that reused a background tile's outputs
    backward_skipped: int = 0  # backward recomputations saved by background groups
    ranks: object = None  # with group=: distributed.RankTimes, each rank's seconds (counts are this rank's)

    def __str__(self) -> str:
        text = (
            f"{self.tiles} tiles: {self.computed} computed, {self.skipped} reused as background in the "
            f"forward, {self.backward_skipped} recomputations saved in the backward"
        )
        return text if self.ranks is None else f"{text}; {self.ranks}"
