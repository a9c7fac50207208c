"""The collectives the ranks of a team exchange small results by, and a counter of what they send.

``gather_packed`` gives every rank every rank's small object (the streamed reductions' partial
results, the seconds each rank computed, the dtypes of the sinks it wrote) in ONE all-gather of
fixed-size byte slots, where ``all_gather_object`` takes two (the sizes, then the bytes) and
pickles its tensors (0.3-0.4 ms each way on this machine for a few tiny tensors). Tensors travel
as their raw bytes, so the values arrive exactly; only a small description (dtypes, shapes, plain
numbers) is pickled. The slot size is agreed without a collective: every rank starts from the
same size, and after each gather every rank has seen every length, so each makes the same choice
for the next (and, when a payload did not fit, the same second round with larger slots).

``counted()`` wraps torch.distributed's primitives and lists every call made inside it, so the
tests hold the performance model's count of collectives against what the engine really sends.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

FIRST_SLOT = 4096  # bytes per rank in the first gather of a team (the length's 8 bytes included)

PRIMITIVES = (
    "all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "broadcast", "barrier",
    "reduce", "gather", "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
    "all_to_all_single", "send", "recv",
)  # fmt: skip


@dataclass(frozen=True)
class _Raw:
    """Where a tensor was in a packed object: its index among the raw tensors, dtype and shape."""

    index: int
    dtype: torch.dtype
    shape: tuple


def pack(obj) -> torch.Tensor:
    """``obj`` (tuples, lists, dicts of tensors and plain values) as bytes: an 8-byte length of the
    pickled description, the description (tensors replaced by ``_Raw``), then the tensors' bytes."""
    tensors: list[torch.Tensor] = []

    def strip(o):
        if isinstance(o, torch.Tensor):
            tensors.append(o.detach().to("cpu").contiguous().reshape(-1))
            return _Raw(len(tensors) - 1, o.dtype, tuple(o.shape))
        if isinstance(o, (list, tuple)):
            return type(o)(strip(x) for x in o)
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items()}
        return o

    meta = pickle.dumps(strip(obj))
    head = torch.tensor([len(meta)], dtype=torch.int64).view(torch.uint8)
    parts = [head, torch.frombuffer(bytearray(meta), dtype=torch.uint8)]
    return torch.cat(parts + [t.view(torch.uint8) if t.numel() else t.new_empty(0).view(torch.uint8)
                              for t in tensors])  # fmt: skip


def unpack(data: torch.Tensor):
    """The object ``pack`` made ``data`` from (a CPU uint8 tensor), its tensors on the CPU."""
    size = int(data[:8].clone().view(torch.int64))
    meta = pickle.loads(data[8 : 8 + size].numpy().tobytes())
    at, raws = 8 + size, []

    def find(o):
        if isinstance(o, _Raw):
            raws.append(o)
        elif isinstance(o, (list, tuple)):
            for x in o:
                find(x)
        elif isinstance(o, dict):
            for x in o.values():
                find(x)

    find(meta)
    tensors = {}
    for raw in sorted(raws, key=lambda r: r.index):
        n = torch.empty((), dtype=raw.dtype).element_size() * _numel(raw.shape)
        tensors[raw.index] = data[at : at + n].clone().view(raw.dtype).reshape(raw.shape)
        at += n

    def fill(o):
        if isinstance(o, _Raw):
            return tensors[o.index]
        if isinstance(o, (list, tuple)):
            return type(o)(fill(x) for x in o)
        if isinstance(o, dict):
            return {k: fill(v) for k, v in o.items()}
        return o

    return fill(meta)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def gather_packed(obj, group, device: torch.device, cache: dict) -> list:
    """Every rank's ``obj`` in rank order, on every rank: one all-gather of ``cache["slot"]``-byte
    slots (each rank's length, then its packed bytes), and a second with slots of the largest
    length (rounded up to a power of two, kept for the next call) when some rank's did not fit."""
    data, size = pack(obj), dist.get_world_size(group)
    slot = cache.setdefault("slot", FIRST_SLOT)
    gathered = _slots(data, slot, size, group, device)
    lengths = [int(g[:8].clone().view(torch.int64)) for g in gathered]
    if max(lengths) + 8 > slot:  # every rank saw the same lengths: all take the second round
        slot = cache["slot"] = 1 << (max(lengths) + 8 - 1).bit_length()
        gathered = _slots(data, slot, size, group, device)
    return [unpack(g[8 : 8 + n]) for g, n in zip(gathered, lengths)]


def _slots(data: torch.Tensor, slot: int, size: int, group, device: torch.device) -> list[torch.Tensor]:
    """One all-gather of ``slot`` bytes per rank: this rank's length (8 bytes), then as much of
    ``data`` as fits; every rank's slot, on the CPU."""
    mine = torch.zeros(slot, dtype=torch.uint8)
    mine[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
    fits = min(len(data), slot - 8)
    mine[8 : 8 + fits] = data[:fits]
    out = torch.empty(size * slot, dtype=torch.uint8, device=device)
    _all_gather_single(out, mine.to(device), group=group)
    out = out.cpu()
    return [out[r * slot : (r + 1) * slot] for r in range(size)]


def _all_gather_single(out: torch.Tensor, mine: torch.Tensor, group) -> None:
    """``all_gather_single`` (torch >= 2.12), else its older name ``all_gather_into_tensor``."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


@contextlib.contextmanager
def counted():
    """Every backend collective called inside, as (name, payload bytes of this rank, seconds), in order.

    It wraps torch.distributed's primitives, outermost call only (an object collective counts as
    the primitives it is sent by), so it lists what the engine sends without trusting the
    engine's own bookkeeping: the tests hold the performance model's count against it, and the
    benchmark times each collective with it."""
    from torch.distributed import distributed_c10d as c10d

    calls, depth, saved = [], [0], {}

    def wrap(name, fn):
        @functools.wraps(fn)
        def counting(*args, **kwargs):
            depth[0] += 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    calls.append((name, _payload(name, args), time.perf_counter() - started))

        return counting

    for name in PRIMITIVES:
        for module in (dist, c10d):
            if hasattr(module, name):
                saved[module, name] = getattr(module, name)
                setattr(module, name, wrap(name, saved[module, name]))
    try:
        yield calls
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)


def _payload(name: str, args) -> int:
    """Bytes of this rank's own tensor in a collective's arguments (a gather's input, the second)."""
    tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
    if not tensors:
        return 0
    t = tensors[-1] if name.startswith("all_gather") else tensors[0]
    return t.numel() * t.element_size()
