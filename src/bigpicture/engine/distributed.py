"""One image's tiles across the ranks of a process group (torch.distributed), exactly.

Every rank of the group calls the net with the same input; each computes its own *share*, a
contiguous run of the plan's tiles (so its reads stay together), balanced by predicted cost:

    tiles   0  1  2  3  4  5  6  7  8  9
    ranks  [  0  0  0  0 ][  1  1  1 ][ 2  2  2 ]

and the results are combined so that every rank holds what one process would:

    dense sinks the tail uses   each rank writes its write boxes into zeros; a sum all-reduce
                                (write boxes partition the sink: x + 0 + 0 = x, exactly)
    streamed reductions         each rank's partial result, gathered and merged in rank order
    backward                    each rank recomputes its own tiles; parameter gradients, those of
                                values of earlier passes and the input gradient are summed over ranks

The untiled tail runs on every rank on the same values, so its gradients need no reduction.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from bigpicture.engine.collectives import gather_packed
from bigpicture.engine.rules.reduce import Partial
from bigpicture.errors import TilingError

CHUNK_BYTES = 64 * 2**20  # the largest piece of a dense tensor on the backend's device at once
# where a backend's collectives take their tensors
_BACKEND_DEVICE = {"gloo": "cpu", "nccl": "cuda", "xccl": "xpu", "mpi": "cpu"}


def shares(weights: list[float], ranks: int) -> list[range]:
    """Contiguous runs of tile indices, one per rank, each near ``1/ranks`` of the total weight.

    Rank r's run ends at the first tile whose cumulative weight reaches (r + 1) / ranks of the
    total (rounded to the nearer side), so no rank is more than one tile off its fair share.
    """
    total, bounds, running, k = float(sum(weights)), [0], 0.0, 1
    for i, w in enumerate(weights):
        while k < ranks and total > 0 and running + w / 2 >= total * k / ranks:
            bounds.append(i)
            k += 1
        running += w
    bounds += [len(weights)] * (ranks + 1 - len(bounds))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


@dataclass
class RankTimes:
    """Seconds each rank computed its tiles in the last call (collectives excluded)."""

    seconds: list[float] = field(default_factory=list)
    communication: float = 0.0  # this rank's seconds in collectives (waiting for slower ranks included)

    @property
    def imbalance(self) -> float:
        """Slowest rank over the mean: 1.0 is a perfect balance."""
        mean = sum(self.seconds) / len(self.seconds) if self.seconds else 0.0
        return max(self.seconds) / mean if mean > 0 else 1.0

    def add(self, seconds: list[float]) -> None:
        self.seconds = [a + b for a, b in zip(self.seconds, seconds)] if self.seconds else list(seconds)

    def __str__(self) -> str:
        per = ", ".join(f"{s:.2f}" for s in self.seconds)
        return (
            f"ranks computed for {per} s; imbalance (slowest / mean) {self.imbalance:.2f}; "
            f"this rank communicated for {self.communication:.2f} s"
        )


def _collective(method):
    """Counts the seconds of a collective into the team's ``times.communication``."""

    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.times.communication += time.perf_counter() - started

    return timed


class Team:
    """The ranks of ``group`` working on one image: which tiles are this rank's, and the collectives.

    ``weights``: a function of a plan giving each tile's predicted cost (from the planner), or None
    to share tiles by count.
    """

    def __init__(
        self, group, weights=None, times: RankTimes | None = None, cache: dict | None = None
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise TilingError(
                "bp.tiled(model, group=...) needs torch.distributed initialised: call "
                "torch.distributed.init_process_group() in each process (torchrun sets its environment)."
            )
        self.group, self.weights = group, weights
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        if self.rank < 0:
            raise TilingError("this process is not a member of the group given to bp.tiled(..., group=)")
        self.device = rank_device(_BACKEND_DEVICE.get(str(dist.get_backend(group)), "cpu"))
        self.times = times if times is not None else RankTimes()
        self.clock = 0.0
        self.cache = {} if cache is None else cache  # id(plan) -> (plan, every rank's share)

    def _objects(self):
        """Where torch.distributed's object collectives (pickles sent as tensors) run: NCCL sends them
        from the *current* CUDA device, so this rank's, or two ranks would share one GPU."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    # -- tiles ---------------------------------------------------------------------------------

    def share(self, plan) -> range:
        """The indices of this rank's tiles in ``plan.tiles``."""
        return range(*self.bounds(plan)[self.rank])

    def bounds(self, plan) -> list[tuple[int, int]]:
        """Every rank's share of ``plan.tiles``: (first index, end index).

        Rank 0 weighs the tiles and sends every rank its share, so ranks on machines with different
        calibrations still split the tiles one way (each tile computed exactly once)."""
        cached = self.cache.get(id(plan))
        if cached is None or cached[0] is not plan:
            ends = torch.zeros(self.size, dtype=torch.int64)
            if self.rank == 0:
                weights = self.weights(plan) if self.weights is not None else [1.0] * len(plan.tiles)
                ends = torch.tensor([r.stop for r in shares(list(weights), self.size)], dtype=torch.int64)
            ends = self.broadcast_tensor(ends).tolist()
            cached = self.cache[id(plan)] = (plan, list(zip([0] + ends[:-1], ends)))
        return cached[1]

    def started(self) -> None:
        self.clock = time.perf_counter()

    def stopped(self) -> float:
        """Seconds since ``started``, counted into this rank's time."""
        return time.perf_counter() - self.clock

    # -- forward -------------------------------------------------------------------------------

    def combine(
        self, ops: dict, dense: dict, partials: dict, device: torch.device, written=None
    ) -> tuple[dict, dict]:
        """The forward's boundary tensors of every rank, on every rank; this rank's time counted.

        ``written``: the sinks of ``dense`` this rank wrote tiles into (default all). The others
        are zeros in a dtype of the caller's guess; they take that of the ranks that wrote (under
        autocast a sink's dtype is known only from a tile), or the sum would mix dtypes."""
        seconds = self.stopped()
        written = set(dense) if written is None else written
        dtypes = {i: t.dtype for i, (k, t) in enumerate(dense.items()) if k in written}
        merged, gathered = self.partials({r: ops[r] for r in partials}, partials, (seconds, dtypes), device)
        for i, k in enumerate(dense):
            found = {d[i] for _, d in gathered if i in d}
            if k not in written and found and dense[k].dtype not in found:
                dense[k] = dense[k].to(found.pop())
        self.dense(dense)
        return dense, merged

    def sum_gradients(self, totals: list, x_grad: torch.Tensor | None, like: list) -> list:
        """The backward's gradients of every rank summed, on every rank; this rank's time counted."""
        seconds = self.stopped()
        if x_grad is not None:
            self.input_gradient(x_grad)
        return self.gradients(totals, like, seconds)

    @_collective
    def dense(self, values: dict) -> None:
        """Sum the sinks that each rank filled on its own write boxes (zeros elsewhere), in place."""
        for t in values.values():
            self.sum_in_place(t)

    @_collective
    def partials(self, ops: dict, partials: dict, about: tuple, device: torch.device) -> tuple[dict, list]:
        """Every rank's partial results merged in rank order, the same on every rank; with them,
        every rank's ``about``: (seconds of compute, dtypes of the dense sinks it wrote)."""
        mine = [(p.value, p.ties, p.count) for p in partials.values()]
        gathered = gather_packed((mine, about), self.group, self.device, self.cache)
        self.times.add([seconds for _, (seconds, _) in gathered])
        merged = {}
        for i, r in enumerate(partials):
            merged[r] = Partial()
            for parts, _ in gathered:
                value, ties, count = parts[i]
                ops[r].merge(merged[r], Partial(_to(value, device), _to(ties, device), count))
        return merged, [a for _, a in gathered]

    # -- backward ------------------------------------------------------------------------------

    @_collective
    def gradients(self, totals: list, like: list, seconds: float = 0.0) -> list:
        """Per-rank gradient sums (None: no tile of this rank reached it) summed over ranks, in one
        all-reduce; None where no rank's tiles reached it. The same sum carries each rank's
        ``seconds`` of backward compute, in its own slot (zeros elsewhere: x + 0 = x, exactly)."""
        wide = torch.float64 if self.device.type != "mps" else torch.float32
        parts = [
            torch.zeros(p.numel(), dtype=wide) if t is None else t.reshape(-1) for t, p in zip(totals, like)
        ]
        present = torch.tensor([t is not None for t in totals], dtype=wide)
        clocks = torch.zeros(self.size, dtype=wide)
        clocks[self.rank] = seconds
        flat = torch.cat([p.to(self.device, wide) for p in parts + [present, clocks]])
        dist.all_reduce(flat, group=self.group)
        self.times.add(flat[-self.size :].tolist())
        flags = flat[-self.size - len(like) : -self.size].tolist()
        out, at = [], 0
        for p, seen in zip(like, flags):
            piece = flat[at : at + p.numel()].reshape(p.shape)
            out.append(piece.to(p.device) if seen > 0 else None)
            at += p.numel()
        return out

    @_collective
    def input_gradient(self, x_grad: torch.Tensor) -> None:
        self.sum_in_place(x_grad)

    def sum_in_place(self, t: torch.Tensor) -> None:
        """``t`` summed over the ranks, in place, through the backend's device (the rank's GPU for
        NCCL) in pieces of at most ``CHUNK_BYTES``: a dense output or input gradient held on the host
        may be larger than the GPU's memory (a 100,000^2 two-channel map in float32: 80 GB)."""
        flat = t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)
        step = max(1, CHUNK_BYTES // max(1, t.element_size()))
        for start in range(0, flat.numel(), step):
            piece = flat[start : start + step]
            on = piece.to(self.device)
            dist.all_reduce(on, group=self.group)
            if on is not piece:
                piece.copy_(on)
        if not t.is_contiguous():  # summed in a contiguous copy
            t.copy_(flat.view(t.shape))

    @_collective
    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        out = [None] * self.size
        with self._objects():
            dist.all_gather_object(out, obj, group=self.group)
        return out

    @_collective
    def barrier(self) -> None:
        dist.barrier(group=self.group)

    @_collective
    def broadcast_tensor(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``t`` of group rank ``src`` (the same shape and dtype on every rank), on every rank, on the CPU."""
        on = t.to(self.device)
        dist.broadcast(on, src=dist.get_global_rank(self.group, src), group=self.group)
        return on.cpu()

    @_collective
    def broadcast(self, obj, src: int = 0):
        """``obj`` of group rank ``src``, on every rank."""
        box = [obj]
        with self._objects():
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, src), group=self.group)
        return box[0]


def from_rank_zero(group, compute):
    """``compute()`` of group rank 0, on every rank of ``group`` (the others do not call it).

    For the planner's tile: ranks choosing on their own could choose differently (each its own
    clock, calibration or free memory) and then plan different tiles."""
    return _rank_zero_first(Team(group), compute, "choose the tile", share=True)


def _rank_zero_first(team, compute, what: str, share: bool):
    """``compute()`` on rank 0 only: its result (on every rank with ``share``, else on rank 0).
    An exception on rank 0 is raised there and, as a TilingError naming it, on every other rank:
    none is left waiting for rank 0."""
    value, error = None, None
    if team.rank == 0:
        try:
            value = compute()
        except Exception as exc:  # the other ranks must hear of it rather than wait for rank 0
            error = exc
    message = None if error is None else f"{type(error).__name__}: {error}"
    sent, message = team.broadcast((value if share else None, message))
    if error is not None:
        raise error
    if message is not None:
        raise TilingError(f"rank 0 could not {what}: {message}")
    return sent if share else value


def shared_store(team, make, resume: bool):
    """``make(overwrite, writer)``: the store of this process. With a team, rank 0 creates (or checks)
    it before the other ranks open it, each rank keeps its own record of its tiles, and a pass that
    any rank saw finished is finished on every rank (its result is the ranks' merged reductions)."""
    if team is None:
        return make(not resume, None)
    writer = f"rank{team.rank}of{team.size}"
    sink = _rank_zero_first(team, lambda: make(not resume, writer), "open the store", share=False)
    sink = sink or make(False, writer)
    longest = max(team.gather(sink.passes), key=len)
    for result in longest[len(sink.passes) :]:
        sink.finish_pass(result)
    return sink


def init_from_env(device: str | None = None) -> torch.device:
    """Start torch.distributed from torchrun's environment; this rank's device.

    NCCL with the CUDA device of this local rank (``rank_device``) where CUDA is available, else
    (or with ``device="cpu"``) gloo on the CPU. The device is made current before the group starts,
    so NCCL's own buffers land on it."""
    cuda = torch.cuda.is_available() and device != "cpu"
    chosen = rank_device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": chosen} if cuda else {}))
    return chosen


def rank_device(kind: str) -> torch.device:
    """This rank's device of ``kind`` (the backend's: "cpu" for gloo, "cuda" for NCCL).

    CUDA: GPU ``LOCAL_RANK`` (torchrun's rank on this node) when this process sees that many GPUs;
    else the current one (a launcher that shows each process only its own GPU, by
    CUDA_VISIBLE_DEVICES, makes it cuda:0; a process that called torch.cuda.set_device, that one)."""
    if kind != "cuda":
        return torch.device(kind)
    local = int(os.environ.get("LOCAL_RANK", "-1"))
    return torch.device(
        "cuda", local if 0 <= local < torch.cuda.device_count() else torch.cuda.current_device()
    )


def launched() -> bool:
    """Whether this process was started by torchrun (or alike) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _to(t, device):
    return None if t is None else t.to(device)
