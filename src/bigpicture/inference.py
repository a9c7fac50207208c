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
"""

from __future__ import annotations

import base64
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .background import BackgroundTiles, MaskedSource
from .errors import TilingError
from .execute import Evaluator, Runner
from .io.sinks import ZarrSink
from .io.sources import TensorSource, as_source
from .plan import Plan
from .rules.reduce import Partial


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

    def __str__(self) -> str:
        return (
            f"{self.tiles} tiles: {self.computed} computed, {self.skipped} reused as background, "
            f"{self.resumed} already done; {self.seconds:.1f} s, waiting {self.read_wait:.1f} s on reads "
            f"and {self.write_wait:.1f} s on writes"
        )


def run(net, src, out=None, *, progress=False, background=None, prefetch=True, resume=True):
    """The output of ``net`` (a ``bp.tiled`` module) on ``src``, without gradients.

    ``src``: a tensor or anything ``bp.io.as_source`` takes (arrays, zarr, slides, volumes, paths).
    ``out``: None keeps dense outputs in memory; a path writes the dense output to a zarr array
    there (chunks = write boxes) and returns that array. With ``resume`` an existing store
    written by the same arguments is continued, else it is started over.
    ``background``: a value (or one per channel), in the units the model sees; interior tiles
    whose read box is all that value are computed once and reused. A ``MaskedSource`` brings
    its own. ``net.report`` tells what was computed, skipped and how long I/O took.
    """
    started = time.perf_counter()
    tensor_input = isinstance(src, torch.Tensor)
    source = src if tensor_input else as_source(src)
    plan, device = net.plan_for(source), net._device()
    if background is None and isinstance(source, MaskedSource):
        background = source.background
    graph, report = Evaluator(plan.split, (source,)), Report(tiles=0)
    with torch.no_grad():
        for stage in plan.earlier + (plan,):
            graph.evaluate_ready()
            derived = {n: graph.env[n] for n in stage.split.derived}
            runner = Runner(stage, (source,), [], device, derived=derived)
            store = None
            if out is not None and stage is plan:
                identity = TensorSource(src).identity() if tensor_input else source.identity()
                store = _open_store(out, net, plan, runner, identity, background, resume)
            bg = None if background is None else BackgroundTiles(stage, background, device)
            dense, reduced = _TileLoop(runner, store, bg, prefetch and not tensor_input, report).run(progress)
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


def _needs_values(runner: Runner) -> bool:
    """Whether the untiled tail computes with a dense output (rather than just returning it)."""
    return any(runner.split.roles.get(u) == "tail" for k in runner.dense for u in k.users)


def _open_store(path, net, plan: Plan, runner: Runner, identity: dict, background, resume: bool) -> ZarrSink:
    if len(runner.dense) != 1:
        raise TilingError(
            f"out= writes one dense output to zarr, and this model has {len(runner.dense)} "
            "(a classifier's reduced outputs are small: run without out=, or return one spatial tensor)"
        )
    sink = runner.dense[0]
    shape, stride = runner.split.shapes[sink], runner.split.strides[sink]
    chunks = (
        *shape[:2],
        *(max(1, min(n, int(t / s))) for n, t, s in zip(shape[2:], plan.tile, stride, strict=True)),
    )
    meta = {
        "model": type(net.model).__qualname__,
        "weights": weights_hash(net.model),
        "input": identity,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "tile": list(plan.tile),
        "grid": list(plan.grid),
        "background": None if background is None else np.asarray(background).tolist(),
        "output": sink.name,
    }
    dtype = torch.empty(0, dtype=plan.dtype).numpy().dtype
    return ZarrSink(path, shape, dtype, chunks, meta=meta, overwrite=not resume)


class _TileLoop:
    """Runs every tile of one plan in order: prefetch, compute or reuse, write, mark done."""

    def __init__(self, runner: Runner, store, bg: BackgroundTiles | None, prefetch: bool, report: Report):
        self.runner, self.plan, self.store, self.bg, self.prefetch = runner, runner.plan, store, bg, prefetch
        self.source, self.report = runner.args[0], report
        masked = bg is not None and isinstance(self.source, MaskedSource)
        self.mask_known = masked and self._fill_is_background()

    def _fill_is_background(self) -> bool:
        region = (slice(0, 1), slice(0, self.source.shape[1]), *(slice(0, 1),) * len(self.plan.tile))
        return self.bg.is_background(torch.as_tensor(self.source.filled(region)).to(self.plan.dtype))

    def run(self, progress: bool) -> tuple[dict, dict]:
        r, s = self.runner, self.runner.split
        if self.store is not None:
            dense = {r.dense[0]: self.store.array}
        else:
            dense = {k: torch.empty(s.shapes[k], dtype=self.plan.dtype) for k in r.dense}
        partials = self._restore()
        todo = [i for i in range(len(self.plan.tiles)) if self.store is None or not self.store.is_done(i)]
        self.report.tiles += len(self.plan.tiles)
        self.report.resumed += len(self.plan.tiles) - len(todo)
        consts = r.consts()
        bar = _bar(progress, len(self.plan.tiles), len(self.plan.tiles) - len(todo))
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
        return dense, {u: partials[u].value for u in r.reductions}

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
            if key in bg.outputs:  # always so when x is None: see read() in _fetcher
                self.report.skipped += 1
            else:
                bg.outputs[key] = self.runner.run_tile(tile, x, consts)
                self.report.computed += 1
            return bg.outputs[key]
        self.report.computed += 1
        return self.runner.run_tile(tile, x, consts)

    def _write(self, i: int, tile, outs: dict, state, dense: dict | None = None) -> None:
        for k, write in zip(self.runner.split.sinks, tile.writes, strict=True):
            if k in self.runner.dense and not write.empty:
                where = (slice(None), slice(None)) + write.slices()
                (dense[k] if dense is not None else self.store)[where] = outs[k]
        if self.store is not None:
            self.store.mark_done(i, state)

    def _wait(self, future) -> None:
        started = time.perf_counter()
        future.result()
        self.report.write_wait += time.perf_counter() - started

    def _state(self, partials: dict):
        if self.store is None or not partials:
            return None
        return {"partials": [[_encode(p.value), _encode(p.ties)] for p in partials.values()]}

    def _restore(self) -> dict:
        partials = {u: Partial() for u in self.runner.reductions}
        state = self.store.state if self.store is not None and self.store.done else None
        if state is not None:
            device = self.runner.device
            for p, (value, ties) in zip(partials.values(), state["partials"], strict=True):
                p.value, p.ties = _decode(value, device), _decode(ties, device)
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
