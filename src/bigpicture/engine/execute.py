"""The tile interpreter: forward over tiles, backward by recomputing each tile.

Forward runs every tile without storing activations and assembles the boundary tensors:
dense sinks (each tile writes its write box) and streamed reductions (each tile adds its
partial result). The untiled tail then runs on them with ordinary autograd.

Backward recomputes each tile with grad enabled and back-propagates only from the outputs
it owns (its write boxes), weighted by the boundary tensors' gradients. Write boxes
partition every sink, so the per-tile parameter gradients sum to the full gradient; input
gradients are summed where read boxes overlap.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.fx.node import map_arg

from bigpicture.engine import capture as g
from bigpicture.engine import held, host_heap
from bigpicture.engine import stages as staging
from bigpicture.engine.amp import autocast, autocast_state
from bigpicture.engine.background import BackgroundTiles
from bigpicture.engine.evaluator import Evaluator
from bigpicture.engine.padding import Value, read
from bigpicture.engine.plan import Plan, Tile, TileStats
from bigpicture.engine.rules.reduce import Partial


class Runner:
    """Runs one plan on one call's inputs."""

    def __init__(
        self,
        plan: Plan,
        args: tuple,
        params: list,
        device: torch.device,
        progress=None,
        derived=None,
        background=None,
        stats=None,
        team=None,
        compiled=None,
    ) -> None:
        plan.lint()  # the plan's tiles checked once, before its first tile runs
        if device.type == "cpu":
            host_heap.keep()  # every tile's tensors from reused pages, not fresh ones (host_heap.py)
        self.plan, self.split, self.args, self.params = plan, plan.split, args, params
        self.device, self.progress = device, progress
        self.derived = derived or {}  # values of earlier passes that the tiles use
        self.crops = staging.read_by_sources(self.derived)  # ...read box by box (``held.Crop``)
        self.stores = held.stores(plan.split, device) if team is None else {}  # cuts' tiers (a team sums)
        self.kept = None  # (tile, its graph) kept from the forward for the backward
        self.keep_last = True  # the last pass; an earlier one where its plan says (kept until its backward)
        self.background = background  # BackgroundTiles: interior background tiles computed once
        self.groups: dict = {}  # background key -> the tiles that share its outputs
        self.stats = stats if stats is not None else TileStats()
        self.compiled = compiled  # compiled.CompiledTiles: one compiled function per tile geometry, or None
        self.team = team  # distributed.Team: the ranks sharing this image's tiles, or None
        self.share = range(len(plan.tiles)) if team is None else team.share(plan)  # indices of its tiles
        self.tiles = tuple(plan.tiles[i] for i in self.share)
        self.autocast = autocast_state(device)  # the forward's, for the backward's recompute
        s = self.split
        self.dense = [k for k in s.sinks if any(s.roles[u] in ("tail", "output") for u in k.users)]
        self.reductions = [r for k in s.sinks for r in k.users if s.roles[r] == "reduce"]
        self.last_use = {}
        for i, node in enumerate(s.order):
            for inp in node.all_input_nodes:
                self.last_use[inp] = i

    # -- one tile ------------------------------------------------------------------------------

    def read_input(self, box) -> torch.Tensor:
        x = self.args[0]
        index = (slice(None), slice(None)) + box.slices()
        crop = x[index] if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x[index]))
        # Contiguous: slide regions arrive channels-last, and torch 2.13's CPU backward of a strided
        # 1x1 convolution corrupts memory on channels-last inputs with few channels (oneDNN #6035).
        return crop.to(device=self.device, dtype=self.plan.dtype).contiguous()

    def consts(self) -> dict:
        """Placeholders other than the image, and the parameter-only nodes the tiles use."""
        s, env = self.split, dict(self.derived)
        env.update((n, held.Crop.of(self.derived[n], self.device)) for n in self.crops)
        placeholders = [n for n in s.gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders[1:], self.args[1:]):
            env[node] = value
        for node in s.order:
            if s.roles[node] == "const" and node.op != "placeholder":
                args, kwargs = map_arg((node.args, node.kwargs), lambda n: self._arg(n, env))
                env[node] = g.call(s.gm, node, args, kwargs)
        return env

    def _arg(self, node, env):
        return self.split.statics[node] if node in self.split.statics else env[node]

    def run_tile(self, tile: Tile, x: torch.Tensor, consts: dict) -> dict:
        """The values of every sink on this tile's write boxes (compiled, where ``compiled`` can)."""
        need = self.plan.needs(tile)
        out = None if self.compiled is None else self.compiled.run(self, tile, need, x, consts)
        return self.eager_tile(tile, x, consts, need) if out is None else out

    def eager_tile(self, tile: Tile, x: torch.Tensor, consts: dict, need: dict) -> dict:
        """The tile interpreter: each spatial node on its ``need`` box, values freed after their last use."""
        s = self.split
        env = dict(consts)
        env[s.input] = Value(x, tile.read)
        writes = dict(zip(s.sinks, tile.writes))
        out = {}
        for i, node in enumerate(s.order):
            if s.roles[node] != "spatial" or node is s.input:
                continue
            box = need[node]
            if box.empty:  # users may still ask for an empty box of it (padding, output_padding)
                shape = s.shapes[node][:2] + box.shape
                env[node] = Value(torch.empty(shape, dtype=self.plan.dtype, device=self.device), box)
            else:
                args, kwargs = map_arg((node.args, node.kwargs), lambda n: self._arg(n, env))
                env[node] = Value(s.ops[node].run(box, args, kwargs), box)
            for inp in node.all_input_nodes:
                if self.last_use.get(inp) == i and s.roles[inp] == "spatial":
                    self._collect(inp, env, writes, out)
                    env.pop(inp, None)
        for k in s.sinks:
            self._collect(k, env, writes, out)
        return out

    def _collect(self, node, env, writes, out) -> None:
        if node in writes and node not in out and node in env:
            out[node] = read(env[node], writes[node], self.split.extents[node])

    # -- all tiles -----------------------------------------------------------------------------

    def forward(self, keep_last: bool = False, input_grad: bool = False) -> tuple[dict, dict]:
        """Every tile without grad, assembling the boundary tensors.

        ``keep_last``: run the last tile with grad and keep its graph, so that the backward, which
        starts from that tile, does not recompute it (one tile's activations, the backward's own peak).
        With ``background``, interior tiles whose input is all background share one computation.
        """
        s = self.split
        like = self.args[0] if isinstance(self.args[0], torch.Tensor) else None
        out_device = like.device if like is not None else torch.device("cpu")
        dense: dict = {}  # made at the first write, in the sink's dtype (autocast's, where it casts)
        partials = {r: Partial() for r in self.reductions}
        self.kept, self.groups = None, {}
        bg, last = self.background, len(self.tiles) - 1
        self.stats.tiles += len(self.tiles)
        self.team and self.team.started()
        with torch.no_grad():
            consts = self.consts()
            for i, tile in enumerate(self._tiles("forward")):
                x = self.read_input(tile.read)
                key = bg.key(tile) if bg is not None else None
                if key is not None and bg.is_background(x):
                    self.groups.setdefault(key, []).append(tile)
                    sinks, reused = bg.shared(key, lambda t=tile, x=x: self.run_tile(t, x, consts))
                    self.stats.skipped += reused
                    self.stats.computed += not reused
                elif keep_last and i == last:
                    self.kept = (tile, self._graph(tile, input_grad, x))
                    sinks = {k: v.detach() for k, v in self.kept[1][2].items()}
                    self.stats.computed += 1
                else:
                    sinks = self.run_tile(tile, x, consts)
                    self.stats.computed += 1
                for k, write in zip(s.sinks, tile.writes):
                    if write.empty:
                        continue
                    if k in self.stores:  # a cut: its whole tensor in its tier
                        if k not in dense:
                            dense[k] = self.stores[k].empty(s.shapes[k], sinks[k].dtype, self.device)
                        self.stores[k].write(dense[k], write, sinks[k])
                    elif k in self.dense:
                        if k not in dense:
                            dense[k] = self._empty(k, out_device, sinks[k].dtype)
                        dense[k][(slice(None), slice(None)) + write.slices()] = sinks[k].to(out_device)
                    for r in k.users:
                        if r in partials:
                            s.ops[r].accumulate(partials[r], sinks[k], write)
        if bg is not None:
            bg.outputs.clear()  # the shared values are in the boundary tensors now
        written = set(dense)
        for k in set(self.dense) - written:  # a sink no tile (of this rank) writes
            dense[k] = self._empty(k, out_device, self.plan.dtype)
        if self.team is not None:  # every rank's sinks and partial results, on every rank
            return self.team.combine(self.split.ops, dense, partials, self.device, written)
        return dense, partials

    def _graph(self, tile: Tile, input_grad: bool, x: torch.Tensor | None = None):
        """The tile run with grad: its input leaf, the leaves of the derived values, its sinks."""
        with torch.enable_grad(), autocast(self.autocast):
            x = self.read_input(tile.read) if x is None else x
            x = x.detach().requires_grad_(input_grad)
            consts, need = self.consts(), self.plan.needs(tile) if self.crops else {}
            boxes = {n: staging.crop_box(n, need) for n in self.crops}  # what it reads of held tensors
            leaves = [held.leaf(self.derived[n], boxes.get(n), self.device)
                      for n in self._derived_with_grad()]
            consts.update(zip(self._derived_with_grad(), leaves))
            return x, leaves, self.run_tile(tile, x, consts)

    def _leaves_like(self) -> list:
        return [self.derived[n] for n in self._derived_with_grad()]

    def _derived_with_grad(self) -> list:
        return [n for n in self.derived if self.derived[n].requires_grad]

    def _empty(self, node, device, dtype):
        new = torch.empty if self.team is None else torch.zeros  # a team sums the ranks' write boxes
        return new(self.split.shapes[node], dtype=dtype, device=device)

    def _units(self, input_grad: bool) -> list[tuple[Tile, list[Tile]]]:
        """What the backward recomputes: (a tile, the tiles whose outputs it stands for).

        A background group is recomputed once and back-propagates the sum of its members' output
        gradients: their outputs are the same function of the parameters, so the parameter
        gradient is the same sum. Input gradients differ per member, so with ``input_grad`` every
        tile stands for itself. The kept tile comes first, the rest in reverse order.
        """
        grouped = {} if input_grad else {id(t): m for m in self.groups.values() for t in m}
        units, seen = [], set()
        for tile in self.tiles[::-1]:
            if id(tile) in seen:
                continue
            members = grouped.get(id(tile), [tile])
            seen.update(id(t) for t in members)
            units.append((tile, members))
        if self.kept is not None:
            units.sort(key=lambda u: u[0] is not self.kept[0])
        return units

    def backward(self, dense_grads: dict, reduce_grads: dict, partials: dict, x_grad: torch.Tensor | None):
        """Per-tile recompute; the summed gradients of the parameters, then of the derived values."""
        s = self.split
        wrt = len(self.params) + len(self._derived_with_grad())
        totals = [None] * wrt
        units = self._units(x_grad is not None)
        kept, self.kept = self.kept, None
        self.team and self.team.started()
        for tile, members in self._tiles("backward", units):
            if kept is not None and kept[0] is tile:
                (x, leaves, sinks), kept = kept[1], None
            else:
                x, leaves, sinks = self._graph(tile, x_grad is not None)
            self.stats.backward_skipped += len(members) - 1
            with torch.enable_grad(), autocast(self.autocast, enabled=False):
                terms = []
                for member in members:
                    for k, write in zip(s.sinks, member.writes):
                        if write.empty:
                            continue
                        if dense_grads.get(k) is not None:
                            grad = dense_grads[k][(slice(None), slice(None)) + write.slices()]
                            terms.append((sinks[k] * grad.to(self.device)).sum())
                        for r in k.users:
                            if reduce_grads.get(r) is not None:
                                w = s.ops[r].weights(partials[r], sinks[k].detach(), write, reduce_grads[r])
                                terms.append((sinks[k] * w).sum())
                del sinks
                if not terms:
                    continue
                total = torch.stack(terms).sum()
                if not total.requires_grad:
                    continue
                inputs = ([x] if x_grad is not None else []) + self.params + [held.tensor(v) for v in leaves]
                grads = torch.autograd.grad(total, inputs, allow_unused=True)
            if x_grad is not None:
                if grads[0] is not None:  # None where the tile reads only padding
                    x_grad[(slice(None), slice(None)) + tile.read.slices()] += grads[0].to(x_grad.device)
                grads = grads[1:]
            for i, gr in enumerate(grads):  # summed in float64: the tiles' order does not show
                crop = leaves[i - len(self.params)] if i >= len(self.params) else None
                if gr is not None and isinstance(crop, held.Crop):  # into the held tensor's gradient
                    totals[i] = crop.add_grad(totals[i], gr)
                elif gr is not None:
                    gr = gr.to(_wide(gr))
                    totals[i] = gr if totals[i] is None else totals[i] + gr
        if self.team is not None:
            totals = self.team.sum_gradients(totals, x_grad, self.params + self._leaves_like())
        return [
            None if t is None else t.to(p.dtype) for t, p in zip(totals, self.params + self._leaves_like())
        ]

    def used_parameters(self) -> set[int]:
        s, used = self.split, set()
        for node in s.order:
            if node.op == "call_module":
                used.update(id(p) for p in s.gm.get_submodule(node.target).parameters())
            elif node.op == "get_attr":
                used.add(id(g.fetch_attr(s.gm, node.target)))
        return used

    def outputs(self, dense: dict, partials: dict) -> list:
        # Detached: autograd.Function gives its outputs a grad_fn, and backward reads the partials.
        return [dense[k] for k in self.dense] + [partials[r].value.detach() for r in self.reductions]

    def _tiles(self, what: str, tiles=None):
        tiles = self.tiles if tiles is None else tiles
        if self.progress is None:
            return tiles
        return self.progress(tiles, desc=f"bigpicture {what}", unit="tile")


def _wide(t: torch.Tensor) -> torch.dtype:
    """The dtype tile gradients are summed in: float64 for floating dtypes where the device has it."""
    return torch.float64 if t.dtype.is_floating_point and t.device.type != "mps" else t.dtype


class TiledFunction(torch.autograd.Function):
    """Boundary tensors of one pass, differentiable in the input, parameters and derived values."""

    @staticmethod
    def forward(ctx, runner: Runner, x, *inputs):
        input_grad = x is not None and x.requires_grad
        dense, partials = runner.forward(keep_last=runner.keep_last, input_grad=input_grad)
        ctx.runner, ctx.partials = runner, partials
        ctx.x_spec = None if x is None else (x.shape, x.dtype, x.device)
        return tuple(runner.outputs(dense, partials))

    @staticmethod
    def backward(ctx, *grads):
        runner = ctx.runner
        n = len(runner.dense)
        dense_grads = dict(zip(runner.dense, grads[:n]))
        reduce_grads = dict(zip(runner.reductions, grads[n:]))
        x_grad = None
        if ctx.x_spec is not None and ctx.needs_input_grad[1]:
            shape, dtype, device = ctx.x_spec
            x_grad = torch.zeros(shape, dtype=dtype, device=device)
        totals = runner.backward(dense_grads, reduce_grads, ctx.partials, x_grad)
        params, derived = totals[: len(runner.params)], iter(totals[len(runner.params) :])
        # A parameter the tiles use gets a gradient, zero if nothing reached it, as in PyTorch.
        used = runner.used_parameters()
        params = [
            torch.zeros_like(p) if gr is None and id(p) in used else gr
            for p, gr in zip(runner.params, params)
        ]
        derived = [next(derived) if v.requires_grad else None for v in runner.derived.values()]
        return (None, x_grad, *params, *derived)


def run(
    plan: Plan,
    args: tuple,
    params: list,
    device: torch.device,
    progress=None,
    background=None,
    stats=None,
    team=None,
    compiled=None,
):
    """The model's output on ``args``, computed tile by tile; differentiable where grad is enabled.

    ``background``: a value (or one per channel) in the units the model sees; interior tiles whose
    read box is all that value are computed once per geometry in the forward, and, when the input
    needs no gradient, recomputed once per geometry in the backward. ``stats``: a ``TileStats``
    to count into. ``team``: a ``distributed.Team``; each rank computes its share of the tiles.
    ``compiled``: a function of a plan (each pass's) giving its ``compiled.CompiledTiles``, or None.
    """
    x = args[0] if isinstance(args[0], torch.Tensor) else None
    stats = stats if stats is not None else TileStats()
    if x is not None and not plan.earlier and len(plan.tiles) == 1 and compiled is None:
        stats.tiles, stats.computed = 1, 1
        return plan.split.gm(*args)  # one tile is the whole image: tiling would only add a recompute
    trainable = [p for p in params if p.requires_grad]
    if torch.is_grad_enabled() and (trainable or (x is not None and x.requires_grad)):
        held.check_training(plan.split)
    graph = Evaluator(plan.split, args)
    for stage in plan.earlier + (plan,):
        graph.evaluate_ready()
        derived = {n: graph.env[n] for n in stage.split.derived}
        bg = None if background is None else BackgroundTiles(stage, background, device)
        pass_compiled = None if compiled is None else compiled(stage)
        runner = Runner(stage, args, trainable, device, progress, derived, bg, stats, team, pass_compiled)
        runner.keep_last = stage is plan or stage.keep_graph
        grad = torch.is_grad_enabled() and (
            bool(trainable)
            or (x is not None and x.requires_grad)
            or any(getattr(v, "requires_grad", False) for v in derived.values())
        )
        if grad:
            outputs = TiledFunction.apply(runner, x, *trainable, *derived.values())
        else:
            outputs = runner.outputs(*runner.forward())
        n = len(runner.dense)
        graph.env.update(zip(runner.dense, outputs[:n]))
        graph.reduced.update(zip(runner.reductions, outputs[n:]))
    return graph.evaluate_ready()
