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
import math
import pickle
import struct
import time

import torch
import torch.distributed as dist

FIRST_SLOT = 4096  # bytes per rank in the first gather of a team (the length's 8 bytes included)

PRIMITIVES = (
    "all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "broadcast", "barrier",
    "reduce", "gather", "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
    "all_to_all_single", "send", "recv",
)  # fmt: skip


_TENSOR = "\0bigpicture-tensor"  # marks a tensor's place in a packed description


def pack(obj) -> bytes:
    """``obj`` (tuples, lists, dicts of tensors and plain values) as bytes: an 8-byte length of the
    pickled description (each tensor replaced by a marker, its dtype's name and shape), the
    description, then the tensors' raw bytes in order. Plain Python and one copy per tensor: a
    torch op costs more than the bytes here."""
    raw: list[bytes] = []

    def strip(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().to("cpu").contiguous().reshape(-1)
            raw.append(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            return (_TENSOR, str(o.dtype).removeprefix("torch."), tuple(o.shape))
        if isinstance(o, (list, tuple)):
            return type(o)(strip(x) for x in o)
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items()}
        return o

    meta = pickle.dumps(strip(obj))
    return b"".join([struct.pack("<q", len(meta)), meta, *raw])


def unpack(data: bytes):
    """The object ``pack`` made ``data`` from, its tensors on the CPU."""
    (size,) = struct.unpack_from("<q", data)
    at = [8 + size]

    def fill(o):
        if isinstance(o, tuple) and len(o) == 3 and o[0] == _TENSOR:
            dtype, shape = getattr(torch, o[1]), o[2]
            n = dtype.itemsize * math.prod(shape)
            chunk, at[0] = data[at[0] : at[0] + n], at[0] + n
            return (
                torch.frombuffer(bytearray(chunk), dtype=dtype).reshape(shape)
                if n
                else torch.empty(shape, dtype=dtype)
            )
        if isinstance(o, (list, tuple)):
            return type(o)(fill(x) for x in o)
        if isinstance(o, dict):
            return {k: fill(v) for k, v in o.items()}
        return o

    return fill(pickle.loads(data[8 : 8 + size]))


def gather_packed(obj, group, device: torch.device, cache: dict) -> list:
    """Every rank's ``obj`` in rank order, on every rank: one all-gather of ``cache["slot"]``-byte
    slots (each rank's length, then its packed bytes), and a second with slots of the largest
    length (rounded up to a power of two, kept for the next call) when some rank's did not fit."""
    data, size = pack(obj), dist.get_world_size(group)
    slot = cache.setdefault("slot", FIRST_SLOT)
    gathered = _slots(data, slot, size, group, device)
    lengths = [struct.unpack_from("<q", g)[0] for g in gathered]
    if max(lengths) + 8 > slot:  # every rank saw the same lengths: all take the second round
        slot = cache["slot"] = 1 << (max(lengths) + 8 - 1).bit_length()
        gathered = _slots(data, slot, size, group, device)
    return [unpack(g[8 : 8 + n]) for g, n in zip(gathered, lengths)]


def _slots(data: bytes, slot: int, size: int, group, device: torch.device) -> list[bytes]:
    """One all-gather of ``slot`` bytes per rank: this rank's length (8 bytes), then as much of
    ``data`` as fits; every rank's slot."""
    mine = (struct.pack("<q", len(data)) + data[: slot - 8]).ljust(slot, b"\0")
    out = torch.empty(size * slot, dtype=torch.uint8, device=device)
    all_gather_single(out, torch.frombuffer(bytearray(mine), dtype=torch.uint8).to(device), group)
    out = out.cpu().numpy().tobytes()
    return [out[r * slot : (r + 1) * slot] for r in range(size)]


def all_gather_single(out: torch.Tensor, mine: torch.Tensor, group) -> None:
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
