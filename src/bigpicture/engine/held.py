"""Where a cut's whole tensor lives between two passes (its tier), and the box of it a tile reads.

A cut (``engine/cuts.py``) is a global stage whose untiled subgraph is the identity: pass k's
tiles write their write boxes of the cut node into a whole tensor, and pass k+1's tiles read the
box each needs through a ``stage_source`` node (``stages.py``):

    pass k tiles   --write box (device -> tier)-->  whole tensor, in a tier
    pass k+1 tiles <--read box (tier -> device)---  a ``Crop`` of it, a leaf of the tile's graph

    tier    where                                     training
    device  the run's own memory                      yes
    host    CPU memory, pinned when the run is on a GPU (on the CPU it is the same memory)   yes
    zarr    a temporary zarr store on disk            no: inference only (its gradient has no tier)

In training each tile's crop is a leaf of its own graph; its gradient is added into the whole
tensor's gradient at the crop's box (in the held tensor's tier and dtype), so no tile ever holds
the whole tensor on the device.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from bigpicture.engine.box import Box
from bigpicture.engine.rules import rule
from bigpicture.engine.rules.reduce import Boundary
from bigpicture.errors import TilingError


def stage_hold(x: torch.Tensor, tier: str = "host") -> torch.Tensor:
    """A cut: ``x`` whole, kept in ``tier`` between the pass that computes it and the next."""
    return x


class Hold(Boundary):
    """``stage_hold``: consumes its whole spatial input (the pass's dense sink), as a flatten does."""


rule(stage_hold)(Hold)


def is_hold(node) -> bool:
    return getattr(node, "target", None) is stage_hold


def _index(box: Box) -> tuple:
    return (slice(None), slice(None)) + box.slices()


class DeviceTier:
    """On the run's device: no transfer, device memory."""

    name, training = "device", True

    def empty(self, shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device)

    def write(self, store, box: Box, value: torch.Tensor) -> None:
        store[_index(box)] = value.to(store.device)


class HostTier(DeviceTier):
    """In CPU memory, page-locked when the run is on a GPU (transfers then run at the link's speed)."""

    name = "host"

    def empty(self, shape, dtype, device):
        pin = torch.device(device).type == "cuda"
        return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pin)


class ZarrTier:
    """In a temporary zarr store on disk, deleted with the held tensor; inference only."""

    name, training = "zarr", False

    def empty(self, shape, dtype, device):
        return ZarrHeld(shape, dtype)

    def write(self, store, box: Box, value: torch.Tensor) -> None:
        store.array[_index(box)] = value.detach().to("cpu", store.stored).numpy()


TIERS = {t.name: t for t in (DeviceTier(), HostTier(), ZarrTier())}


def tier(name: str):
    if name not in TIERS:
        raise TilingError(f"no tier {name!r} to keep a cut's tensor in; known: {', '.join(TIERS)}.")
    return TIERS[name]


class ZarrHeld:
    """A whole tensor in a zarr array of a temporary directory; indexing gives torch tensors.

    bfloat16 (which numpy lacks) is stored as float32, which holds it exactly."""

    requires_grad = False

    def __init__(self, shape, dtype: torch.dtype) -> None:
        import zarr

        self.shape, self.dtype = tuple(shape), dtype
        self.stored = torch.float32 if dtype == torch.bfloat16 else dtype
        self.path = tempfile.mkdtemp(prefix="bigpicture-cut-")
        weakref.finalize(self, shutil.rmtree, self.path, True)
        item = np.dtype(torch.empty((), dtype=self.stored).numpy().dtype)
        self.array = zarr.open_array(self.path, mode="w", shape=self.shape, dtype=item)

    def __getitem__(self, key) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.array[key])).to(self.dtype)


def stores(split, device) -> dict:
    """The sinks of ``split`` that are cuts, each with the tier its whole tensor is kept in."""
    return {k: tier(u.kwargs.get("tier", "host")) for k in split.sinks for u in k.users if is_hold(u)}


def zarr_cuts(split) -> list:
    """The cut nodes kept on disk (inference only)."""
    return [n.args[0] for n in split.gm.graph.nodes if is_hold(n) and n.kwargs.get("tier") == "zarr"]


@dataclass(frozen=True)
class Crop:
    """The part ``values`` of a held tensor ``whole`` that covers ``box``, read onto ``device``.

    In a training tile ``values`` is the tile's own leaf (on the device); else it is the whole."""

    values: object  # a tensor or a ZarrHeld
    box: Box
    device: torch.device
    whole: object = None

    @classmethod
    def of(cls, whole, device) -> Crop:
        return cls(whole, Box.from_shape(tuple(whole.shape[2:])), device, whole)

    @classmethod
    def leaf(cls, whole, box: Box, device) -> Crop:
        """A training tile's leaf: the box of ``whole`` it reads, on the device, needing a gradient."""
        values = whole[_index(box)].to(device).detach().requires_grad_()
        return cls(values, box, device, whole)

    def read(self, out: Box) -> torch.Tensor:
        """Box ``out`` of the whole tensor on the device, a copy (a tile's in-place ops may write it)."""
        return self.values[_index(out.relative_to(self.box))].to(self.device, copy=True)

    def add_grad(self, total, grad: torch.Tensor):
        """``total`` (the whole tensor's gradient so far, or None) with this leaf's gradient added."""
        if total is None and tuple(grad.shape) == tuple(self.whole.shape):  # a crop of it all (one tile)
            return grad.to(self.whole.device, self.whole.dtype).contiguous()  # no zeros, no add
        if total is None:
            total = torch.zeros(self.whole.shape, dtype=self.whole.dtype, device=self.whole.device)
        total[_index(self.box)] += grad.to(total.device, total.dtype)
        return total


def leaf(value, box: Box | None, device):
    """A derived value as a leaf of one tile's graph: with ``box``, the part of a held tensor the
    tile reads (a ``Crop``), else the whole value."""
    return value.detach().requires_grad_() if box is None else Crop.leaf(value, box, device)


def tensor(leaf):
    """The tensor autograd differentiates for a tile's leaf (a ``Crop``'s own part, or the leaf)."""
    return leaf.values if isinstance(leaf, Crop) else leaf


def check_training(split) -> None:
    """A ``TilingError`` for a training run with a cut kept on disk: its gradient has no tier."""
    cuts = zarr_cuts(split)
    if cuts:
        raise TilingError(
            f"cuts: `{cuts[0].name}` is kept in the zarr tier, which serves inference only (the cut's "
            "gradient would need a tier too). Keep training cuts in host memory (tier 'host'), or run "
            "this under torch.no_grad() / net.run(...) for inference."
        )
