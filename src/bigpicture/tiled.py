"""``bp.tiled(model, tile=...)``: an ``nn.Module`` with the model's outputs and gradients, tile by tile."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from bigpicture.engine import execute
from bigpicture.engine.amp import autocast_dtype, no_autocast_cache
from bigpicture.engine.distributed import from_rank_zero
from bigpicture.engine.plan import Plan, capture, default_tile, plan_graph, plan_splits
from bigpicture.errors import TilingError
from bigpicture.perf.compiled import compiled_plan
from bigpicture.perf.devices import DEVICES, Device, get_device
from bigpicture.perf.predict import predict
from bigpicture.perf.schedule import (
    analyse,
    best_tile,
    budget_reason,
    default_budget,
    for_run,
    parse_memory,
    staged_plan,
)


class Tiled(nn.Module):
    """Wraps ``model``; ``parameters()`` are the model's own, so any optimiser works unchanged.

    Plans are made per input shape, dtype, device, train/eval state and whether gradients are
    taken, and cached. With ``memory=`` (or ``tile="auto"``) each plan's tile is the planner's.
    """

    def __init__(
        self,
        model: nn.Module,
        tile=None,
        progress: bool = False,
        multipass: bool = True,
        memory=None,
        background=None,
        group=None,
        cuts=None,
        host_memory=None,
        compile: bool | dict = False,
    ) -> None:
        super().__init__()
        if memory is not None and tile is not None and tile != "auto":
            raise TypeError(
                f"bp.tiled got tile={tile!r} and memory={memory!r}: give one, tile= for a tile of your "
                "choice, memory= for the fastest one the planner predicts to fit."
            )
        if memory is not None:
            parse_memory(memory)  # a size that is not one fails now, not at the first call
        self.model = model
        self.tile = tile  # None: the planner's, for the device's memory (default_budget)
        self.memory = memory
        self.progress = progress
        self.multipass = multipass
        self.background = background
        self.group = group  # a torch.distributed process group sharing each image's tiles, or None
        self.cuts, self.host_memory = cuts, host_memory  # stages kept in a slower tier (perf/cuts.py)
        self._graphs: dict = {}
        self._plans: dict = {}
        self._shares: dict = {}  # with group=: each plan's tiles per rank
        self.compile = compile  # True, or torch.compile options (mode=, max_geometries=)
        self._compiled: dict = {}  # id(plan of one pass) -> its compiled.CompiledTiles
        self.plan: Plan | None = None
        self.report = None  # what the last call or `run` did (tiles computed, reused; I/O wait)

    @property
    def planned(self) -> bool:
        """Whether the planner chooses the tile: ``memory=``, ``tile="auto"`` or no tile given."""
        return self.memory is not None or self.tile in (None, "auto")

    def plan_for(self, x, *args, training: bool | None = None) -> Plan:
        """The plan for input ``x``, cached by shape, dtype, device and train/eval state; runs nothing.

        ``training``: plan (and predict) a forward and backward; default: when gradients are
        enabled and the model has parameters that require them (or ``x`` requires them).
        """
        shape = tuple(x.shape)
        dtype = x.dtype if isinstance(x, torch.Tensor) else self._param_dtype()
        device, state = self._device(), tuple(m.training for m in self.model.modules())
        if training is None:  # a backward will follow
            wants_grad = getattr(x, "requires_grad", False) or any(
                p.requires_grad for p in self.model.parameters()
            )
            training = torch.is_grad_enabled() and wants_grad
        described = tuple(_describe(a) for a in args)
        amp = autocast_dtype(device, dtype)  # under torch.autocast, convolutions compute in its dtype
        key = (shape, dtype, amp, device, state, described, training)
        if key not in self._plans:
            with no_autocast_cache():  # casts of parameters on fake tensors must not be cached
                self._plans[key] = self._new_plan(key, described, args)
        self.plan = self._plans[key]
        return self.plan

    def _new_plan(self, key: tuple, described: tuple, args: tuple) -> Plan:
        shape, dtype, amp, device, state, _, training = key
        inputs = [(shape, dtype, device)] + [_fake_spec(a) for a in args]
        graph_key = key[:-1]  # a graph is checked against the model for each input shape
        if graph_key not in self._graphs:
            self._graphs[graph_key] = capture(self.model, self.multipass, inputs)
        gm = self._graphs[graph_key]
        same = (shape, dtype, amp, device, state, described, not training)
        if self.cuts is not None:
            dev = planning_device(device)
            agree = None if self.group is None else partial(from_rank_zero, self.group)  # ranks agree
            plan = staged_plan(gm, inputs, self.tile, self.memory, dev, amp, training, self.multipass,
                               self.cuts, self.host_memory, agree)  # fmt: skip
            return compiled_plan(plan) if self.compile and amp == dtype else plan
        if self.planned:
            return self._choose(gm, inputs, training, amp)
        if same in self._plans:  # the same tiles; only the prediction differs
            return replace(self._plans[same], training=training)
        plan = for_run(plan_graph(gm, inputs, self.tile, self.multipass), None, device, training)
        plan = plan if amp == dtype else replace(plan, predictor=partial(_predict_in, amp))
        return compiled_plan(plan) if self.compile and amp == dtype else plan

    def _choose(self, gm, inputs: list, training: bool, amp: torch.dtype) -> Plan:
        """The planner's plan: the fastest predicted tile whose predicted peak fits ``memory`` (by
        default the device's, ``default_budget``). With no tile given on a device the planner has
        no figures for, ``default_tile``, and the plan's note says why. ``amp``: the dtype
        convolutions compute in (autocast's, where it casts the input's)."""
        shape, dtype, device = inputs[0]
        try:
            dev = planning_device(device)
        except TilingError:
            if self.tile is not None or self.memory is not None:
                raise
            plan = plan_graph(gm, inputs, default_tile(len(shape) - 2), self.multipass)
            reason = f"no tile= given and no performance figures for {device}: the fixed default tile"
            return replace(for_run(plan, None, device, training), note=reason)
        run_dtype = amp if dtype.is_floating_point else self._param_dtype()
        budget = default_budget(dev) if self.memory is None else self.memory
        splits = analyse(gm, shape, self.multipass, inputs)
        choose = partial(best_tile, splits, shape, budget, dev, run_dtype, training)
        best = choose() if self.group is None else from_rank_zero(self.group, choose)  # ranks agree
        if self.memory is None:
            best = best.with_note(f"{budget_reason(dev, self.tile)}; {best.note}")
        return for_run(plan_splits(splits, shape, dtype, best.tile), None, dev, training, best)

    def forward(self, x, *args):
        plan = self.plan_for(x, *args)
        progress = _progress_bar() if self.progress else None
        self.report = execute.TileStats()
        params, device = list(self.model.parameters()), self._device()
        team = self._team()
        self.report.ranks = team and team.times
        compiled = self.compiled_tiles if self.compile else None
        out = execute.run(
            plan, (x, *args), params, device, progress, self.background, self.report, team, compiled
        )
        return as_model_output(out, plan.split.gm.meta.get("bigpicture_output"))

    def compiled_tiles(self, plan: Plan):
        """The compiled tile functions of one pass's plan, made on first use and kept with the plan."""
        from bigpicture.engine.compiled import CompiledTiles

        if id(plan) not in self._compiled:
            options = self.compile if isinstance(self.compile, dict) else {}
            self._compiled[id(plan)] = CompiledTiles(plan, **options)
        return self._compiled[id(plan)]

    def _team(self):
        """The ranks of ``group`` for one call, sharing tiles by their predicted cost."""
        if self.group is None:
            return None
        from bigpicture.engine.distributed import Team
        from bigpicture.perf.multi import tile_costs

        return Team(self.group, tile_costs, cache=self._shares)

    def run(self, src, out=None, **kwargs):
        """Inference into memory or a resumable zarr store: see ``bigpicture.engine.inference.run``."""
        from bigpicture.engine.inference import run

        if self.background is not None:
            kwargs.setdefault("background", self.background)
        with torch.no_grad():  # inference: plans (and memory= tiles) for a forward only
            return run(self, src, out, **kwargs)

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _param_dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def extra_repr(self) -> str:
        return f"memory={self.memory!r}" if self.memory is not None else f"tile={self.tile!r}"


def tiled(
    model: nn.Module,
    tile=None,
    memory=None,
    progress: bool = False,
    multipass: bool = True,
    background=None,
    group=None,
    cuts=None,
    host_memory=None,
    compile: bool | dict = False,
) -> Tiled:
    """``model`` run tile by tile: same outputs, parameter gradients and input gradients.

    ``tile`` is the input extent each tile owns, excluding its halo (an int for every spatial
    dimension, or one per dimension), rounded to the network's total stride where needed. Without
    it the planner chooses the tile: for each input shape, the fastest tile whose predicted peak
    memory fits ``memory`` (bytes, or a size such as ``"8GiB"``; default the device's memory, on
    the CPU half of the machine's), on the model's own device ("cpu", or a CUDA GPU from the
    device table) in the input's dtype, for a training step when gradients are enabled and the
    model has trainable parameters, else for a forward. On a device the planner has no figures
    for, no tile means ``engine.plan.default_tile`` (1024 in 2D, 128 in 3D), and ``print(net.plan)``
    says so. ``tile="auto"`` is the same as no tile. Give ``tile`` or ``memory``, not both.
    A budget no tile fits is a ``TilingError`` at the first call, naming the least memory that
    would do. ``print(net.plan)`` shows the plan of the last call with its prediction and, for
    the planner's tile, why it was chosen.
    Global ops in the middle of the network (GroupNorm, InstanceNorm statistics, squeeze-excitation)
    are exact by extra passes over the tiles, one more per level of them; ``print(net.plan)`` says
    how many and for which ops. ``multipass=False`` allows one pass only and makes them an error.
    ``background``: a value (or one per channel) in the units the model sees, e.g. 1.0 for the
    white glass of a normalised slide. Interior tiles whose whole read box is that value compute
    the same outputs, so each geometry of them is computed once in the forward and, when the
    input needs no gradient, recomputed once in the backward with the summed output gradients:
    exactly the results of computing every tile. ``net.report`` counts what was reused.
    ``group``: a ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD``) whose
    ranks share each image's tiles. Every rank calls the net with the same input and computes a
    contiguous share of the tiles balanced by predicted cost (a lazy source is read only there);
    dense outputs and streamed reductions are combined so that every rank gets the model's
    output, and the backward leaves every rank with the single-process gradients (summed over the
    image's tiles, not averaged). ``net.report.ranks`` has each rank's time and the imbalance.
    ``cuts``: cut the network into stages at these nodes (their names in the captured graph, or a
    module's path; a dict gives each a tier: "host", "device" or, for inference, "zarr"), or
    ``"auto"`` for the cuts the planner predicts fastest. Each cut's whole value (and in training
    its gradient) is kept in host memory (pinned on a GPU; on the CPU the same memory), at most
    ``host_memory`` (default half of this machine's RAM), and the layers after it tile it with
    their own halo: small tiles then recompute far less. Exact, forward and backward;
    ``print(net.plan)`` shows the stages, their tiers and the bytes they move per step.
    ``compile``: compile each tile geometry once with ``torch.compile`` (``engine.compiled``; the
    forward, and the backward's recompute with its backward) and reuse it for every translate of
    that tile; ``print(net.plan)`` predicts the compiled step. A dict passes ``max_geometries=`` and
    ``mode=``. Where compiling fails or cannot be exact, a warning says why and tiles run eagerly.
    Float32 results match the untiled model to torch.compile's own rounding (README).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bp.tiled expects an nn.Module, got {type(model).__name__}")
    return Tiled(model, tile, progress, multipass, memory, background, group, cuts, host_memory, compile)


def planning_device(device: torch.device | str) -> Device:
    """The device-table entry the planner predicts a model on ``device`` with.

    The CPU is this machine; a CUDA GPU is looked up by its product name. Any other device, or a GPU
    missing from the table, is a ``TilingError``: the planner would only guess its figures.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return get_device("cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if device.type == "cuda":
        product = name.removeprefix("NVIDIA ").removeprefix("Tesla ").replace(" ", "-")
        try:
            return get_device(product)
        except TilingError:
            pass
    raise TilingError(
        f"memory= has no performance figures for {name!r} ({device}); the device table knows "
        f"{', '.join(DEVICES)} and 'cpu'. Give tile= instead (the input extent each tile owns, e.g. "
        "tile=1024), or choose it with bp.choose_tile(model, shape, budget, device=bigpicture.perf.devices."
        "Device(...)) describing this device."
    )


def as_model_output(out, structure: TreeSpec | None):
    """``out`` in the model's own containers: graphs give fx's immutable dicts and lists, and plain
    tuples and dicts for namedtuples and OrderedDicts; ``structure`` is the model's (from the check
    of the capture), else the containers are made plain dicts, lists and tuples."""
    leaves = tree_flatten(out)[0]
    if structure is not None and structure.num_leaves == len(leaves):
        return tree_unflatten(leaves, structure)
    if isinstance(out, dict):
        return {k: as_model_output(v, None) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return (list if isinstance(out, list) else tuple)(as_model_output(v, None) for v in out)
    return out


def _predict_in(dtype: torch.dtype, plan: Plan):
    """The plan's prediction for a run whose convolutions compute in ``dtype`` (autocast's)."""
    return predict(plan, dtype=dtype)


def _describe(a):
    return (tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else repr(a)


def _fake_spec(a):
    return (tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a


def _progress_bar():
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra
        return None
    return tqdm
