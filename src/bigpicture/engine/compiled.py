"""Compiled tiles: each tile geometry traced once, compiled with ``torch.compile``, reused for its translates.

Tiles whose boxes on every node are translates of one another (``tiles.geometry``) run the same
ops on tensors of the same shapes at the same relative offsets, so one compiled function serves
them all; a tile at the image border (in some dimension) keys on its absolute position there,
because its padding differs:

    tile  --geometry key-->  cache  --miss: trace (make_fx, fake tensors), torch.compile--> function
                                    --hit:  the function on this tile's input crop and constants

Why trace first: ``make_fx`` runs the tile interpreter once on fake tensors, with the input crop,
the tile's constants (derived statistics, extra inputs, parameter-only nodes) and the model's
parameters and buffers as *inputs*, so every Python decision (boxes, padding, index arithmetic) is
made once and the graph holds only tensor ops. Dynamo then sees a flat graph per geometry (its own
code object, so its own cache entries): it guards on tensor metadata and grad mode only, with
``dynamic=False`` and ``fullgraph=True``; AOTAutograd gives the recompute with grad its compiled
backward; inductor fuses the pointwise and normalisation chains. Gradients reach the model's own
parameters because they are passed in, not captured.

Limits. Each geometry is compiled at most twice (without grad for the forward, with grad for the
recompute), below dynamo's per-function recompile limit (``torch._dynamo.config.recompile_limit``,
8); were it hit, dynamo runs that graph eagerly (exact, slower). At most ``max_geometries`` are
compiled per plan (dynamo's ``accumulated_recompile_limit`` counts them all); tiles of further
geometries run eagerly, with one warning. Compilation that fails (no C compiler, an op inductor
does not lower, an untraceable rule) is a warning naming the reason, and that plan runs eagerly
from then on: the results stay exact, only the speed is lost. (A training step compiles each
geometry's forward without grad first, so a broken compiler shows there; a failure in compiling a
backward alone, which AOTAutograd does at its first call, is raised, not caught.) A plan whose
tiles compute different values at translates (align_corners interpolation, a global stage's
output) is not compiled.
"""

from __future__ import annotations

import itertools
import warnings

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_flatten, tree_unflatten

from bigpicture.engine.amp import autocast_state
from bigpicture.engine.background import _why_not_exact
from bigpicture.engine.plan import Plan, Tile
from bigpicture.engine.tiles import geometry, translation_period

MAX_GEOMETRIES = 64
_NAMES = itertools.count()


class CompiledTiles:
    """One plan's (one pass's) compiled tile functions, by geometry; counts what it compiled."""

    def __init__(self, plan: Plan, max_geometries: int = MAX_GEOMETRIES, mode: str | None = None) -> None:
        self.plan, self.split = plan, plan.split
        self.max_geometries, self.mode = max_geometries, mode
        self.functions: dict = {}  # geometry key -> compiled function (None: eager for that geometry)
        self.compilations = 0  # geometries traced and compiled
        self.compiled_calls = 0  # tiles run by a compiled function
        self.eager_calls = 0  # tiles run eagerly
        self.period = translation_period(self.split)
        self.off = _why_not_compiled(self.split)  # why this plan runs eagerly ("" while it compiles)
        if self.off:
            warnings.warn(f"compile=True: tiles run eagerly: {self.off}", stacklevel=3)

    def __str__(self) -> str:
        why = f"; eager because {self.off}" if self.off else ""
        return (
            f"{self.compilations} geometries compiled; {self.compiled_calls} tiles compiled, "
            f"{self.eager_calls} eager{why}"
        )

    def key(self, tile: Tile, need: dict, device) -> tuple | None:
        extent = self.plan.input_shape[2:]
        free = tuple(lo > 0 and hi < n for lo, hi, n in zip(tile.read.lo, tile.read.hi, extent, strict=True))
        shape = geometry(self.split, tile, need, self.period, free)
        if shape is None:
            return None
        return shape, repr(autocast_state(device))

    def run(self, runner, tile: Tile, need: dict, x: torch.Tensor, consts: dict) -> dict | None:
        """The tile's sinks from its geometry's compiled function; None where it runs eagerly."""
        if self.off:
            self.eager_calls += 1
            return None
        key = self.key(tile, need, runner.device)
        if key not in self.functions:
            self.functions[key] = self._new(key, runner, tile, need, x, consts)
        fn = self.functions[key]
        if fn is None or self.off:
            self.eager_calls += 1
            return None
        try:
            out = fn(x, consts)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager interpreter is exact
            self._give_up(f"compiling a tile failed ({type(e).__name__}: {_first_line(e)})")
            self.eager_calls += 1
            return None
        self.compiled_calls += 1
        return out

    def _new(self, key, runner, tile: Tile, need: dict, x: torch.Tensor, consts: dict):
        if key is None:
            return None
        if self.compilations >= self.max_geometries:
            if self.compilations == self.max_geometries:
                warnings.warn(
                    f"compile=True: more than {self.max_geometries} tile geometries in this plan; the "
                    "tiles of the others run eagerly (a tile size that divides the image, or fewer "
                    "distinct border tiles, gives fewer)",
                    stacklevel=4,
                )
                self.compilations += 1  # warn once
            return None
        try:
            fn = TileFunction(runner, tile, need, x, consts, self.mode)
        except Exception as e:  # noqa: BLE001 - a rule make_fx cannot trace: eager is exact
            self._give_up(f"tracing a tile failed ({type(e).__name__}: {_first_line(e)})")
            return None
        self.compilations += 1
        return fn

    def _give_up(self, reason: str) -> None:
        self.off = reason
        self.functions = dict.fromkeys(self.functions)
        warnings.warn(f"compile=True: tiles run eagerly from now on: {reason}", stacklevel=4)


class TileFunction:
    """One geometry's tile as a flat graph of tensor ops, compiled; called with any translate's
    input crop and constants (the same shapes), it returns that tile's sinks."""

    def __init__(self, runner, tile: Tile, need: dict, x: torch.Tensor, consts: dict, mode) -> None:
        gm, sinks = runner.split.gm, runner.split.sinks
        self.sinks = sinks
        self.nodes = list(consts)
        leaves, self.spec = tree_flatten([consts[n] for n in self.nodes])
        self.tensor_at = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        self.leaves = leaves  # the non-tensor leaves are baked into the graph
        state = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers())}
        self.names, self.params = list(state), list(state.values())  # the model's own objects

        def tile_sinks(x, tensors, params):
            values = list(self.leaves)
            for i, t in zip(self.tensor_at, tensors, strict=True):
                values[i] = t
            env = dict(zip(self.nodes, tree_unflatten(values, self.spec), strict=True))
            with _reparametrize_module(gm, dict(zip(self.names, params, strict=True)), tie_weights=True):
                out = runner.eager_tile(tile, x, env, need)
            return [out.get(k) for k in sinks]

        with torch.no_grad():
            traced = make_fx(tile_sinks, tracing_mode="fake")(x, self._tensors(consts), self.params)
        traced.__class__.__name__ = f"bigpicture_tile_{next(_NAMES)}"  # its own code, its own cache
        self.compiled = torch.compile(traced, dynamic=False, fullgraph=True, mode=mode)

    def _tensors(self, consts: dict) -> list:
        leaves = tree_flatten([consts[n] for n in self.nodes])[0]
        return [leaves[i] for i in self.tensor_at]

    def __call__(self, x: torch.Tensor, consts: dict) -> dict:
        out = self.compiled(x, self._tensors(consts), self.params)
        return {k: v for k, v in zip(self.sinks, out, strict=True) if v is not None}


def _why_not_compiled(split) -> str:
    """Why one compiled function per geometry could differ from a translate's eager run."""
    why = _why_not_exact(split)
    if why:
        return why
    for node, op in split.ops.items():
        if split.roles.get(node) == "spatial" and getattr(op, "indices", False) and node in split.sinks:
            return f"`{node.name}` outputs max-pooling indices, which are image positions"
    return ""


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""
