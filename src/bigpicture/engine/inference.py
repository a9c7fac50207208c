"""Inference over a whole image, tile by tile: into memory, or into a zarr store that resumes.

``run(net, src, out)`` follows the plan mechanically. Three things overlap per tile:

    reader thread   read tile i+1's read box from the source     (prefetch)
    main thread     compute tile i                                (or reuse: background)
    writer thread   write tile i-1's write box, then mark it done (zarr only)

Resume: the store's attributes hold the run's arguments (``meta``: weights hash, tile, input,
dtype, grid, background) and the record of finished tiles, written after each tile's data,
atomically, together with the streamed reductions accumulated so far. A run killed at any
moment (SIGKILL too) and started again with the same arguments skips the finished tiles and
continues the reductions from the stored partial results in the same order, so the result
is bitwise the same as an uninterrupted run; only tiles that were in flight are redone.

Several dense outputs (deep supervision, a segmentation and a boundary map, at any strides) go
into one zarr group, one array each with its own write-box chunks, under one record. A model
run in several passes (``multipass=True``) opens the store before its first pass; each finished
earlier pass leaves its streamed reductions in the record (``passes``), so a resumed run starts
the later passes from them, and reruns only the tiles in flight in the pass it was killed in.
"""

from __future__ import annotations

import base64
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from bigpicture.engine.background import BackgroundTiles, MaskedSource
from bigpicture.engine.distributed import shared_store
from bigpicture.engine.evaluator import Evaluator
from bigpicture.engine.execute import Runner
from bigpicture.engine.rules.reduce import Partial
from bigpicture.errors import TilingError
from bigpicture.io.sinks import ZarrGroupSink, ZarrSink
from bigpicture.io.sources import TensorSource, as_source


@dataclass
class Report:
    """What one ``run`` did: tiles computed, resumed (already done), skipped; seconds spent."""

    tiles: int
    computed: int = 0
    resumed: int = 0
    skipped: int = 0
    read_wait: float = 0.0  # main thread waiting for the input of the next tile
    write_wait: float = 0.0  # main thread waiting for the previous tile's write
    seconds: float = 0.0
    ranks: object = None  # with a group: distributed.RankTimes (the counts above are this rank's)

    def __str__(self) -> str:
        return (
            f"{self.tiles} tiles: {self.computed} computed, {self.skipped} reused as background, "
            f"{self.resumed} already done; {self.seconds:.1f} s, waiting {self.read_wait:.1f} s on reads "
            f"and {self.write_wait:.1f} s on writes" + ("" if self.ranks is None else f"; {self.ranks}")
        )


def run(net, src, out=None, *, progress=False, background=None, prefetch=None, resume=True):
    """The output of ``net`` (a ``bp.tiled`` module) on ``src``, without gradients.

    ``src``: a tensor or anything ``bp.io.as_source`` takes (arrays, zarr, slides, volumes, paths).
    ``out``: None keeps dense outputs in memory; a path writes them to zarr there (chunks = write
    boxes) and returns the zarr arrays in the model's output structure. One dense output is one
    zarr array at ``out``; several are the arrays of a zarr group at ``out``, named by their place
    in the output (``"0"``, ``"1"``, ... in a tuple, the keys of a dict, ``"1.0"`` nested). With
    ``resume`` an existing store written by the same arguments is continued, else it is started
    over; with ``multipass`` models, finished passes are not run again.
    ``background``: a value (or one per channel), in the units the model sees; interior tiles
    whose read box is all that value are computed once and reused. A ``MaskedSource`` brings
    its own. ``net.report`` tells what was computed, skipped and how long I/O took. A ``net`` built
    with ``memory=`` runs the planner's tile for a forward, whether or not gradients are enabled.
    ``prefetch``: a reader thread reads the next tile while this one computes. Default: on for a
    GPU, off for the CPU, where the reader (decoding slide tiles) takes the cores the compute uses:
    a slide ran 15-25% slower with it on 2 cores (benchmarks/RESULTS.md).
    """
    started = time.perf_counter()
    tensor_input = isinstance(src, torch.Tensor)
    source = src if tensor_input else as_source(src)
    plan, device = net.plan_for(source, training=False), net._device()  # memory=: a tile for a forward
    if prefetch is None:  # a GPU computes while the reader reads; a CPU's cores would be shared
        prefetch = torch.device(device).type != "cpu"
    if background is None and isinstance(source, MaskedSource):
        background = source.background
    stages, team = plan.earlier + (plan,), net._team()
    compiled = net.compiled_tiles if getattr(net, "compile", False) else (lambda stage: None)
    runners = [Runner(stage, (source,), [], device, team=team, compiled=compiled(stage)) for stage in stages]
    store = targets = None
    if out is not None:
        identity = TensorSource(src).identity() if tensor_input else source.identity()
        store, targets = _open_store(out, net, runners, identity, background, resume, team)
    graph, report = Evaluator(plan.split, (source,)), Report(tiles=0, ranks=team and team.times)
    with torch.no_grad():
        for p, runner in enumerate(runners):
            stage = runner.plan
            graph.evaluate_ready()
            runner.derived = {n: graph.env[n] for n in stage.split.derived}
            if store is not None and p < len(store.passes):  # finished before: only its results
                dense = {k: targets[k].array for k in runner.dense}
                reduced = _decode_reduced(store.passes[p], runner)
                report.tiles += len(stage.tiles)
                report.resumed += len(stage.tiles)
            else:
                bg = None if background is None else BackgroundTiles(stage, background, device)
                loop = _TileLoop(runner, store, targets, bg, prefetch and not tensor_input, report)
                dense, reduced = loop.run(progress)
                if store is not None and p < len(runners) - 1:
                    store.finish_pass({"reduced": [_encode(reduced[u]) for u in runner.reductions]})
            if store is not None and _needs_values(runner):
                dense = {k: torch.from_numpy(np.asarray(v[:])) for k, v in dense.items()}
            graph.env.update(dense)
            graph.reduced.update(reduced)
        result = graph.evaluate_ready()
    report.seconds = time.perf_counter() - started
    net.report = report
    if progress:
        print(f"bigpicture: {report}")
    return result


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def output_names(split, dense: list) -> dict:
    """The name of each dense sink's array in a store: its place in the model's output.

    ``"0"``, ``"1"``, ... for the items of a tuple or list, the key for a dict item, joined with
    ``"."`` when nested (``"1.0"``); ``"0"`` for an output that is the tensor itself. A sink that
    the output does not return directly (the untiled rest computes with it) is named after its node.
    """
    output = next(n for n in split.gm.graph.nodes if n.op == "output")
    places: dict = {}

    def walk(arg, path):
        if isinstance(arg, torch.fx.Node):
            places.setdefault(arg, ".".join(path) or "0")
        elif isinstance(arg, (tuple, list)):
            for i, a in enumerate(arg):
                walk(a, (*path, str(i)))
        elif isinstance(arg, dict):
            for key, a in arg.items():
                walk(a, (*path, str(key).replace("/", "_")))

    walk(output.args[0], ())
    names: dict = {}
    for k in dense:
        name = places.get(k, k.name).lstrip("._") or "0"
        while name in names.values():
            name = f"{name}_"
        names[k] = name
    return names


def _needs_values(runner: Runner) -> bool:
    """Whether the untiled tail computes with a dense output (rather than just returning it)."""
    return any(runner.split.roles.get(u) == "tail" for k in runner.dense for u in k.users)


def _open_store(path, net, runners: list[Runner], identity: dict, background, resume: bool, team=None):
    """The store at ``path`` and, per dense sink of every pass, the target its tiles write into.

    With a team, every rank writes its tiles into the one store, keeping its own record of them.
    """
    plan = runners[-1].plan
    dense = [(r, k) for r in runners for k in r.dense]
    if not dense:
        raise TilingError(
            "out= writes the dense (spatial) outputs to zarr, and this model has none: its outputs are "
            "reduced over the image and small, so run without out="
        )
    specs = {}
    dtype = torch.empty(0, dtype=plan.dtype).numpy().dtype
    for r, k in dense:
        shape, stride = r.split.shapes[k], r.split.strides[k]
        chunks = (
            *shape[:2],
            *(max(1, min(n, int(t / s))) for n, t, s in zip(shape[2:], r.plan.tile, stride, strict=True)),
        )
        specs[k] = (shape, dtype, chunks)
    meta = {
        "model": type(net.model).__qualname__,
        "weights": weights_hash(net.model),
        "input": identity,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "tile": list(plan.tile),
        "grid": list(plan.grid),
        "background": None if background is None else np.asarray(background).tolist(),
        "output": dense[0][1].name if len(dense) == 1 else [k.name for _, k in dense],
    }
    if len(runners) > 1:
        meta["passes"] = len(runners)
    if team is not None:  # a resumed run must give every rank the same tiles again
        meta["ranks"] = [team.bounds(r.plan) for r in runners]
    if len(dense) == 1:
        ((_, k),) = dense

        def one(overwrite: bool, writer: str | None):
            return ZarrSink(path, *specs[k], meta=meta, overwrite=overwrite, writer=writer)

        sink = shared_store(team, one, resume)
        return sink, {k: sink}
    names = output_names(plan.split, [k for _, k in dense])
    arrays = {names[k]: spec for k, spec in specs.items()}

    def group(overwrite: bool, writer: str | None):
        return ZarrGroupSink(path, arrays, meta=meta, overwrite=overwrite, writer=writer)

    sink = shared_store(team, group, resume)
    return sink, {k: sink[names[k]] for k in specs}


def _decode_reduced(stored: dict, runner: Runner) -> dict:
    values = stored["reduced"]
    return {u: _decode(v, runner.device) for u, v in zip(runner.reductions, values, strict=True)}


class _TileLoop:
    """Runs every tile of one plan in order: prefetch, compute or reuse, write, mark done."""

    def __init__(self, runner: Runner, store, targets, bg: BackgroundTiles | None, prefetch: bool, report):
        self.runner, self.plan, self.store, self.bg, self.prefetch = runner, runner.plan, store, bg, prefetch
        self.targets = targets  # dense sink -> where its write boxes go in the store
        self.source, self.report = runner.args[0], report
        masked = bg is not None and isinstance(self.source, MaskedSource)
        self.mask_known = masked and self._fill_is_background()

    def _fill_is_background(self) -> bool:
        region = (slice(0, 1), slice(0, self.source.shape[1]), *(slice(0, 1),) * len(self.plan.tile))
        return self.bg.is_background(torch.as_tensor(self.source.filled(region)).to(self.plan.dtype))

    def run(self, progress: bool) -> tuple[dict, dict]:
        r, s = self.runner, self.runner.split
        if self.store is not None:
            dense = {k: self.targets[k].array for k in r.dense}
        else:
            dense = {k: r._empty(k, torch.device("cpu"), r.plan.dtype) for k in r.dense}
        partials = self._restore()
        todo = [i for i in r.share if self.store is None or not self.store.is_done(i)]
        self.report.tiles += len(r.share)
        self.report.resumed += len(r.share) - len(todo)
        consts = r.consts()
        bar = _bar(progress, len(r.share), len(r.share) - len(todo))
        r.team and r.team.started()
        reader, writer = ThreadPoolExecutor(1, "bp-read"), ThreadPoolExecutor(1, "bp-write")
        try:
            fetch = self._fetcher(reader, todo)
            pending = None
            for n, i in enumerate(todo):
                tile = self.plan.tiles[i]
                x, key = fetch(n)
                outs = self._compute(tile, x, key, consts)
                for k, write in zip(s.sinks, tile.writes, strict=True):
                    for u in k.users if not write.empty else ():
                        if u in partials:
                            s.ops[u].accumulate(partials[u], outs[k], write)
                state = self._state(partials)
                if pending is not None:
                    pending = self._wait(pending)
                if self.store is not None:
                    pending = writer.submit(self._write, i, tile, outs, state)
                else:
                    self._write(i, tile, outs, state, dense)
                _tick(bar, self.report)
            if pending is not None:
                self._wait(pending)
        finally:
            reader.shutdown(wait=True, cancel_futures=True)
            writer.shutdown(wait=True)
            if bar is not None:
                bar.close()
        if r.team is not None:
            partials = self._combine(dense, partials)
        return dense, {u: partials[u].value for u in r.reductions}

    def _combine(self, dense: dict, partials: dict) -> dict:
        """Every rank's results: dense outputs summed in memory, or all written to the store."""
        team = self.runner.team
        _, merged = team.combine(
            self.runner.split.ops, dense if self.store is None else {}, partials, self.runner.device
        )
        if self.store is not None:
            team.barrier()  # every rank's tiles are in the store before any rank reads it
        return merged

    def _fetcher(self, reader: ThreadPoolExecutor, todo: list[int]):
        """``fetch(n)``: the input of the n-th tile to do (None: known background) and its key."""
        tiles = [self.plan.tiles[i] for i in todo]
        keys = [self.bg.key(t) if self.bg is not None else None for t in tiles]
        futures: dict = {}

        def read(n):
            if self.mask_known and self.bg.known(keys[n]) and self.source.constant_at(tiles[n].read.slices()):
                return None
            return self.runner.read_input(tiles[n].read)

        def fetch(n):
            started = time.perf_counter()
            x = futures.pop(n).result() if n in futures else read(n)
            self.report.read_wait += time.perf_counter() - started
            if self.prefetch and n + 1 < len(tiles):
                futures[n + 1] = reader.submit(read, n + 1)
            return x, keys[n]

        return fetch

    def _compute(self, tile, x, key, consts) -> dict:
        bg = self.bg
        if bg is not None and key is not None and (x is None or bg.is_background(x)):
            # reused always when x is None: see read() in _fetcher
            outs, reused = bg.shared(key, lambda: self.runner.run_tile(tile, x, consts))
            self.report.skipped += reused
            self.report.computed += not reused
            return outs
        self.report.computed += 1
        return self.runner.run_tile(tile, x, consts)

    def _write(self, i: int, tile, outs: dict, state, dense: dict | None = None) -> None:
        for k, write in zip(self.runner.split.sinks, tile.writes, strict=True):
            if k in self.runner.dense and not write.empty:
                where = (slice(None), slice(None)) + write.slices()
                (dense[k] if dense is not None else self.targets[k])[where] = outs[k]
        if self.store is not None:
            self.store.mark_done(i, state)

    def _wait(self, future) -> None:
        started = time.perf_counter()
        future.result()
        self.report.write_wait += time.perf_counter() - started

    def _state(self, partials: dict):
        if self.store is None or not partials:
            return None
        return {"partials": [[_encode(p.value), _encode(p.ties), p.count] for p in partials.values()]}

    def _restore(self) -> dict:
        partials = {u: Partial() for u in self.runner.reductions}
        state = self.store.state if self.store is not None and self.store.done else None
        if state is not None:
            device = self.runner.device
            for p, (value, ties, *count) in zip(partials.values(), state["partials"], strict=True):
                p.value, p.ties = _decode(value, device), _decode(ties, device)
                p.count = count[0] if count else 0  # moments (multipass) weigh each tile by it
        return partials


def _encode(t: torch.Tensor | None):
    """A tensor as JSON, bit for bit (streamed reductions must resume exactly)."""
    if t is None:
        return None
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    dtype = str(t.dtype).removeprefix("torch.")
    return {"dtype": dtype, "shape": list(t.shape), "data": base64.b64encode(raw).decode()}


def _decode(d, device):
    if d is None:
        return None
    raw = bytearray(base64.b64decode(d["data"]))
    flat = torch.frombuffer(raw, dtype=torch.uint8).view(getattr(torch, d["dtype"]))
    return flat.reshape(d["shape"]).to(device)


def _bar(progress: bool, total: int, initial: int):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra
        return None
    return tqdm(total=total, initial=initial, desc="bigpicture", unit="tile", dynamic_ncols=True)


def _tick(bar, report: Report) -> None:
    if bar is None:
        return
    bar.update(1)
    if bar.n % 8 == 0 or bar.n == bar.total:
        bar.set_postfix(skipped=report.skipped, read_wait=f"{report.read_wait:.0f}s", refresh=False)
