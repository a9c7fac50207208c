"""The collectives one step of tiles shared by N ranks makes, and their predicted seconds.

``collectives(plan, n)`` lists, pass by pass, every collective ``engine.distributed.Team`` sends
once the ranks' shares are known (the first call of a plan adds one broadcast of the shares'
bounds, which a step of a training loop does not repeat). ``tests/test_distributed_comm.py``
holds this list against the collectives counted in the engine on 2 and 3 gloo ranks, so the two
cannot drift apart. Per pass, in order:

    forward   one all-gather of fixed byte slots: the streamed reductions' partial results,
              each rank's compute seconds and the dtypes of the sinks it wrote (``engine.
              collectives.gather_packed``); the slot is ``FIRST_SLOT`` bytes unless a pass's
              results need more (then the next power of two, for every pass after)
              one sum all-reduce per piece of at most ``CHUNK_BYTES`` of each dense sink the
              untiled tail uses (the ranks' write boxes into zeros)
    backward  (training) a sum all-reduce of the input gradient in pieces, when the input needs one;
              one sum all-reduce of the parameter gradients in float64, with one flag per
              gradient (did any tile reach it) and one slot per rank for its backward seconds

Seconds per collective (assumptions):
- a ring over n ranks (gloo's and NCCL's algorithm for these sizes): an all-reduce of B bytes
  takes 2 (n-1) steps of the link's latency plus 2 (n-1)/n B over the bandwidth; an all-gather
  of B bytes from each rank takes (n-1) steps plus (n-1) B over the bandwidth. Over m nodes of
  g devices the all-reduce is hierarchical (NCCL's tree/ring): within the node as above, then
  2 (m-1)/m (B/g) over each device's own network adapter; an all-gather takes the slower link.
- the latency per ring step and the bandwidth are separate figures: the device table's (NVLink,
  PCIe, InfiniBand; latencies assumed), or, for gloo on this machine, fitted by
  ``benchmarks/distributed.py``: the latency on small messages, the bandwidth on large ones.
- links reach ``LINK_EFFICIENCY`` of their specified bandwidth (nccl-tests bus bandwidths reach
  70-90%); a fitted link is given as measured / LINK_EFFICIENCY, so it reaches what was measured.
- packing the gathered results costs ``PACK_S`` on the CPU per rank's payload (this rank's packed
  once, every rank's unpacked): Python and one copy per tensor, no pickled tensors.
- no overlap with compute: the engine combines after its last tile, and the step's waiting for
  the slowest rank is the imbalance of the shares, not communication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bigpicture.engine.collectives import FIRST_SLOT
from bigpicture.engine.distributed import CHUNK_BYTES
from bigpicture.engine.plan import Plan
from bigpicture.perf.devices import Interconnect

LINK_EFFICIENCY = 0.8  # assumed: nccl-tests bus bandwidths reach 70-90% of the link's specification
PACK_S = 40e-6  # assumed: pack or unpack one rank's results (60-80 us measured here at load 7)
META_BYTES, TENSOR_META_BYTES = 96, 48  # a packed payload's pickled description: base, per tensor


@dataclass(frozen=True)
class Collective:
    """One collective of a step: what it carries, its kind, this rank's payload, its pass."""

    what: str  # "reductions", "dense outputs", "input gradient" or "parameter gradients"
    kind: str  # "all_gather" or "all_reduce"
    nbytes: int
    stage: int  # index of the pass (earlier passes first)


def collectives(plan: Plan, n: int, input_grad: bool = False) -> list[Collective]:
    """Every collective that ``n`` ranks sharing ``plan``'s tiles send in one call (one step when
    ``plan.training``), in the engine's order; none on one rank, or when the plan is one tile
    (every rank then runs the untiled model)."""
    passes = [*plan.earlier, plan]
    if n == 1 or (len(passes) == 1 and len(plan.tiles) == 1):
        return []
    item = _item(plan.dtype)
    slot = max(FIRST_SLOT, *(_slot(_packed_bytes(stage.split, item)) for stage in passes))
    out, trainable = [], _trainable(plan)
    for i, stage in enumerate(passes):
        s = stage.split
        out.append(Collective("reductions", "all_gather", slot, i))
        out += _pieces("dense outputs", [math.prod(s.shapes[k]) * item for k in _dense(s)], i)
    if plan.training:
        for i, stage in reversed(list(enumerate(passes))):  # autograd runs the last pass's first
            if input_grad:
                out += _pieces("input gradient", [math.prod(plan.split.shapes[plan.split.input]) * item], i)
            derived = stage.split.derived  # values of earlier passes: each a gradient and a flag
            values = sum(trainable) + sum(stage.split.sizes.get(d, 0) for d in derived)
            flags = len(trainable) + len(derived)
            out.append(Collective("parameter gradients", "all_reduce", 8 * (values + flags + n), i))
    return out


def communication(
    plan: Plan, n: int, nodes: int, links, input_grad: bool = False
) -> tuple[tuple[tuple[str, float], ...], int]:
    """Seconds of each kind of collective in one step (and of packing the gathered results), and
    the bytes of the gradient buffer."""
    seconds: dict[str, float] = {}
    calls = collectives(plan, n, input_grad)
    for c in calls:
        seconds[c.what] = seconds.get(c.what, 0.0) + collective_s(c, n, nodes, links)
        if c.kind == "all_gather":
            seconds["packing"] = seconds.get("packing", 0.0) + (1 + n) * PACK_S
    buffer = max((c.nbytes for c in calls if c.what == "parameter gradients"), default=0)
    if plan.training and not buffer:
        buffer = 8 * sum(_trainable(plan))
    return tuple(seconds.items()), buffer


def collective_s(c: Collective, n: int, nodes: int, links) -> float:
    return (all_gather_s if c.kind == "all_gather" else all_reduce_s)(c.nbytes, n, nodes, links)


def all_reduce_s(nbytes: float, n: int, nodes: int, links) -> float:
    """Seconds of a (hierarchical) ring all-reduce of ``nbytes`` over ``n`` ranks on ``nodes`` nodes."""
    if n == 1 or nbytes == 0:
        return 0.0
    within, between = links
    g, m = n // nodes, nodes
    seconds = _ring(nbytes, g, within)
    return seconds + (_ring(nbytes / g, m, between) if m > 1 else 0.0)


def all_gather_s(nbytes: float, n: int, nodes: int, links) -> float:
    """Seconds to gather ``nbytes`` from each of ``n`` ranks on every rank (a ring; the slower link)."""
    if n == 1:
        return 0.0
    link = links[1] if nodes > 1 else links[0]
    return (n - 1) * (link.latency_s + nbytes / (LINK_EFFICIENCY * link.bandwidth_bytes_per_s))


def _ring(nbytes: float, n: int, link: Interconnect) -> float:
    if n == 1:
        return 0.0
    bandwidth = LINK_EFFICIENCY * link.bandwidth_bytes_per_s
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * link.latency_s


def _pieces(what: str, sizes: list[int], stage: int) -> list[Collective]:
    """The all-reduces of tensors of ``sizes`` bytes, each in pieces of at most ``CHUNK_BYTES``."""
    out = []
    for size in sizes:
        for start in range(0, size, CHUNK_BYTES):
            out.append(Collective(what, "all_reduce", min(CHUNK_BYTES, size - start), stage))
    return out


def _dense(s) -> list:
    """The sinks the untiled tail (or the output) uses: each rank's write boxes are summed."""
    return [k for k in s.sinks if any(s.roles.get(u) in ("tail", "output") for u in k.users)]


def _packed_bytes(s, item: int) -> int:
    """About what ``gather_packed`` sends for one pass: each streamed reduction's partial result
    (one value per image and channel, and for a maximum or minimum an int64 count or index of
    the positions equal to it), the pickled description, and the dtype of each dense sink."""
    values = 0
    for sink, r in [(k, r) for k in s.sinks for r in k.users if s.roles.get(r) == "reduce"]:
        how = getattr(s.ops.get(r), "how", None)  # StreamedReduction's; others: value and ties, 8 bytes
        each = item + (8 if how in ("max", "min", "first") else 0) if how else 16
        values += each * math.prod(s.shapes[sink][:2]) + 2 * TENSOR_META_BYTES
    return 8 + META_BYTES + 24 * len(_dense(s)) + values


def _slot(nbytes: int) -> int:
    """The engine's slot for a payload of ``nbytes``: the next power of two of it and its length."""
    return 1 << (nbytes + 8 - 1).bit_length()


def _trainable(plan: Plan) -> list[int]:
    """The numel of each parameter that takes a gradient (every one the engine sums, used or not)."""
    model = plan.split.gm.meta.get("bigpicture_model", plan.split.gm)
    return [p.numel() for p in model.parameters() if p.requires_grad]


def _item(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() if dtype.is_floating_point else 4
