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
from dataclasses import dataclass, replace
from fractions import Fraction

import torch

from . import graph as g
from .box import Box, grid
from .errors import TilingError
from .regions import needs, receptive_field
from .rules.stats import rewrite_global_norms
from .split import Split, split, stages


@dataclass(frozen=True)
class Tile:
    index: tuple[int, ...]
    box: Box  # input pixels this tile owns
    read: Box  # input pixels it reads: box plus halo, within the image
    writes: tuple[Box, ...]  # per sink of the plan, the region this tile computes


@dataclass(frozen=True)
class Plan:
    split: Split
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    requested: tuple[int, ...]
    tile: tuple[int, ...]
    tiles: tuple[Tile, ...]
    earlier: tuple[Plan, ...] = ()  # passes before this one, for global ops (multipass=True)

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
        lo = [max((t.box.lo[d] - t.read.lo[d] for t in self.tiles), default=0) for d in range(len(self.tile))]
        hi = [max((t.read.hi[d] - t.box.hi[d] for t in self.tiles), default=0) for d in range(len(self.tile))]
        return tuple(zip(lo, hi))

    @property
    def receptive_field(self) -> tuple[int, ...]:
        return receptive_field(self.split)

    def lint(self) -> None:
        """Check that write boxes partition every sink and read boxes lie in the image."""
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
            ("halo", ", ".join(f"-{a}/+{b}" for a, b in self.halo) + " input px (below/above, per dim)"),
            ("receptive field", " x ".join(map(str, self.receptive_field)) + " input px"),
        ]
        if self.earlier:
            rows.append(("passes", f"{len(self.earlier) + 1} over the tiles; the earlier ones compute "
                                   "image statistics that later tiles use"))  # fmt: skip
        for p, stage in enumerate(self.earlier + (self,)):
            for k, sink in enumerate(stage.split.sinks):
                stride = "x".join(str(f) for f in s.strides[sink])
                kind = "reduced" if any(s.roles.get(u) == "reduce" for u in sink.users) else "dense"
                name = f"pass {p} sink {k}" if self.earlier else f"sink {k}"
                rows.append((name, f"`{sink.name}` {kind}, shape {s.extents[sink]}, stride {stride}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


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
    spatial = tuple(input_shape[2:])
    requested = _per_dim_tile(tile, len(spatial))
    used = tuple(
        _round_tile(t, n, [s.strides[k][d] for k in s.sinks])
        for d, (t, n) in enumerate(zip(requested, spatial))
    )
    per_dim = []
    for t, n in zip(used, spatial):
        count = math.ceil(n / t)
        per_dim.append([(j * t, n if j == count - 1 else (j + 1) * t) for j in range(count)])
    tiles = []
    for index, box in grid(per_dim):
        writes = tuple(_write_box(index, used, per_dim, s.strides[k], s.extents[k]) for k in s.sinks)
        if all(w.empty for w in writes):
            continue
        read = needs(s, dict(zip(s.sinks, writes)))[s.input]
        tiles.append(Tile(index, box, read, writes))
    plan = Plan(s, tuple(input_shape), dtype, requested, used, tuple(tiles))
    plan.lint()
    return plan


def _per_dim_tile(tile, nd: int) -> tuple[int, ...]:
    tile = (
        (tile,) * nd if isinstance(tile, int) else tuple(tile) if isinstance(tile, (tuple, list)) else (tile,)
    )
    if len(tile) != nd or not all(isinstance(t, int) and t > 0 for t in tile):
        raise TilingError(
            f"tile={tile} does not fit a {nd}D input: give one positive int, or {nd} of them "
            f"(one per spatial dimension), e.g. tile={(256,) * nd}."
        )
    return tile


def _round_tile(t: int, n: int, strides: list[Fraction]) -> int:
    unit = math.lcm(*[f.numerator for f in strides])
    t = min(t, math.ceil(n / unit) * unit)
    return max(unit, round(t / unit) * unit)


def _write_box(index, used, per_dim, stride, extent) -> Box:
    dims = []
    for d, j in enumerate(index):
        w = int(Fraction(used[d]) / stride[d])
        lo = min(j * w, extent[d])
        hi = extent[d] if j == len(per_dim[d]) - 1 else min((j + 1) * w, extent[d])
        dims.append((lo, hi))
    return Box.from_dims(dims)


def make_plan(
    model: torch.nn.Module, input_shape, tile=1024, dtype=torch.float32, device="cpu", multipass=False
) -> Plan:
    """The plan for ``model`` on an input of ``input_shape`` (N, C, *spatial), with no tensor allocated."""
    gm = capture(model, multipass)
    return plan_graph(gm, [(tuple(input_shape), dtype, torch.device(device))], tile, multipass)


def capture(model: torch.nn.Module, multipass: bool = False):
    gm = g.capture(model)
    if multipass:
        rewrite_global_norms(gm)
    return gm


def plan_graph(gm, inputs: list, tile, multipass: bool = False) -> Plan:
    """Plan a captured graph for placeholder inputs given as (shape, dtype, device) or values."""
    shape, dtype, _ = inputs[0]
    if len(shape) < 3:
        raise TilingError(f"input shape {tuple(shape)} has no spatial dimension: expected (N, C, *spatial).")
    values = g.propagate(gm, inputs)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    plans = [plan_for_split(s, shape, dtype, tile) for s in stages(split(gm, values, x, multipass))]
    return replace(plans[-1], earlier=tuple(plans[:-1]))
