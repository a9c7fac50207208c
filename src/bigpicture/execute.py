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

from . import graph as g
from .padding import Value, read
from .plan import Plan, Tile
from .rules.reduce import Partial


class Runner:
    """Runs one plan on one call's inputs."""

    def __init__(self, plan: Plan, args: tuple, params: list, device: torch.device, progress=None) -> None:
        self.plan, self.split, self.args, self.params = plan, plan.split, args, params
        self.device, self.progress = device, progress
        s = self.split
        self.dense = [k for k in s.sinks if any(s.roles[u] in ("tail", "output") for u in k.users)]
        self.reductions = [n for n in s.gm.graph.nodes if s.roles[n] == "reduce"]
        self.last_use = {}
        for i, node in enumerate(s.order):
            for inp in node.all_input_nodes:
                self.last_use[inp] = i

    # -- one tile ------------------------------------------------------------------------------

    def read_input(self, box) -> torch.Tensor:
        x = self.args[0]
        index = (slice(None), slice(None)) + box.slices()
        crop = x[index] if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x[index]))
        return crop.to(device=self.device, dtype=self.plan.dtype)

    def consts(self) -> dict:
        """Placeholders other than the image, and the parameter-only nodes the tiles use."""
        s, env = self.split, {}
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
        """The values of every sink on this tile's write boxes."""
        s, need = self.split, self.plan.needs(tile)
        env = dict(consts)
        env[s.input] = Value(x, tile.read)
        writes = dict(zip(s.sinks, tile.writes))
        out = {}
        for i, node in enumerate(s.order):
            if s.roles[node] != "spatial" or node is s.input:
                continue
            box = need[node]
            if not box.empty:
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

    def forward(self) -> tuple[dict, dict]:
        s = self.split
        like = self.args[0] if isinstance(self.args[0], torch.Tensor) else None
        out_device = like.device if like is not None else torch.device("cpu")
        dense = {k: self._empty(k, out_device) for k in self.dense}
        partials = {r: Partial() for r in self.reductions}
        with torch.no_grad():
            consts = self.consts()
            for tile in self._tiles("forward"):
                sinks = self.run_tile(tile, self.read_input(tile.read), consts)
                for k, write in zip(s.sinks, tile.writes):
                    if write.empty:
                        continue
                    if k in dense:
                        dense[k][(slice(None), slice(None)) + write.slices()] = sinks[k].to(out_device)
                    for r in k.users:
                        if r in partials:
                            s.ops[r].accumulate(partials[r], sinks[k], write)
        return dense, partials

    def _empty(self, node, device):
        return torch.empty(self.split.shapes[node], dtype=self.plan.dtype, device=device)

    def backward(self, dense_grads: dict, reduce_grads: dict, partials: dict, x_grad: torch.Tensor | None):
        """Per-tile recompute; returns the summed parameter gradients (None where unused)."""
        s = self.split
        totals = [None] * len(self.params)
        for tile in self._tiles("backward"):
            with torch.enable_grad():
                x = self.read_input(tile.read).detach().requires_grad_(x_grad is not None)
                sinks = self.run_tile(tile, x, self.consts())
                terms = []
                for k, write in zip(s.sinks, tile.writes):
                    if write.empty:
                        continue
                    if dense_grads.get(k) is not None:
                        grad = dense_grads[k][(slice(None), slice(None)) + write.slices()]
                        terms.append((sinks[k] * grad.to(self.device)).sum())
                    for r in k.users:
                        if reduce_grads.get(r) is not None:
                            w = s.ops[r].weights(partials[r], sinks[k].detach(), write, reduce_grads[r])
                            terms.append((sinks[k] * w).sum())
                if not terms:
                    continue
                total = torch.stack(terms).sum()
                if not total.requires_grad:
                    continue
                inputs = ([x] if x_grad is not None else []) + self.params
                grads = torch.autograd.grad(total, inputs, allow_unused=True)
            if x_grad is not None:
                x_grad[(slice(None), slice(None)) + tile.read.slices()] += grads[0].to(x_grad.device)
                grads = grads[1:]
            for i, gr in enumerate(grads):
                if gr is not None:
                    totals[i] = gr if totals[i] is None else totals[i] + gr
        return totals

    def _tiles(self, what: str):
        if self.progress is None:
            return self.plan.tiles
        return self.progress(self.plan.tiles, desc=f"bigpicture {what}", unit="tile")

    # -- after the tiles -----------------------------------------------------------------------

    def tail(self, boundary: dict, reduced: dict):
        """Run the untiled rest of the graph on the boundary tensors."""
        s, env = self.split, dict(boundary)
        placeholders = iter(self.args)
        for node in s.gm.graph.nodes:
            role = s.roles[node]
            if node.op == "placeholder":
                value = next(placeholders, None)
                env.setdefault(node, value)
            elif node.op == "output":
                return map_arg(node.args[0], env.__getitem__)
            elif role == "static":
                env[node] = s.statics[node]
            elif role == "reduce":
                rest, kwargs = map_arg((node.args[1:], node.kwargs), env.__getitem__)
                env[node] = s.ops[node].finalize(reduced[node], rest, kwargs)
            elif role in ("const", "tail"):
                args, kwargs = map_arg((node.args, node.kwargs), env.__getitem__)
                env[node] = g.call(s.gm, node, args, kwargs)
        raise AssertionError("graph without output")


class TiledFunction(torch.autograd.Function):
    """Boundary tensors of the tiled part, differentiable in the input and the parameters."""

    @staticmethod
    def forward(ctx, runner: Runner, x, *params):
        dense, partials = runner.forward()
        ctx.runner, ctx.partials = runner, partials
        ctx.x_shape = None if x is None else (x.shape, x.dtype, x.device)
        outputs = [dense[k] for k in runner.dense] + [partials[r].value for r in runner.reductions]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        runner = ctx.runner
        n = len(runner.dense)
        dense_grads = dict(zip(runner.dense, grads[:n]))
        reduce_grads = dict(zip(runner.reductions, grads[n:]))
        x_grad = None
        if ctx.x_shape is not None and ctx.needs_input_grad[1]:
            shape, dtype, device = ctx.x_shape
            x_grad = torch.zeros(shape, dtype=dtype, device=device)
        param_grads = runner.backward(dense_grads, reduce_grads, ctx.partials, x_grad)
        return (None, x_grad, *param_grads)


def run(plan: Plan, args: tuple, params: list, device: torch.device, progress=None):
    """The model's output on ``args``, computed tile by tile; differentiable where grad is enabled."""
    runner = Runner(plan, args, params, device, progress)
    x = args[0] if isinstance(args[0], torch.Tensor) else None
    trainable = [p for p in params if p.requires_grad]
    runner.params = trainable
    grad = torch.is_grad_enabled() and (bool(trainable) or (x is not None and x.requires_grad))
    if grad:
        outputs = TiledFunction.apply(runner, x, *trainable)
    else:
        dense, partials = runner.forward()
        outputs = [dense[k] for k in runner.dense] + [partials[r].value for r in runner.reductions]
    n = len(runner.dense)
    boundary = dict(zip(runner.dense, outputs[:n]))
    reduced = dict(zip(runner.reductions, outputs[n:]))
    return runner.tail(boundary, reduced)
