"""Reading a box of a tile value, with the padding an op applies outside the image.

A tile value is a tensor of layout (N, C, *spatial) plus the box it covers, in the node's
own image coordinates. Ops ask for a box that may reach outside the image; the part outside
is the op's own padding, made here exactly as PyTorch makes it for the whole image:

    image          |0 ........................ n)
    asked box   |ppp|vvvvvvvv|                      p: padding, v: values read
    constant: fill value     reflect: x[-i] = x[i]     replicate: clamp     circular: mod n
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bigpicture.engine.box import Box

MODES = ("constant", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class Value:
    """A node's value on one tile: ``tensor`` holds the image region ``box``.

    Not a tuple, so that ``torch.fx`` argument mapping treats it as one leaf.
    """

    tensor: torch.Tensor
    box: Box

    def __iter__(self):
        return iter((self.tensor, self.box))


def source_range(lo: int, hi: int, n: int, mode: str) -> tuple[int, int]:
    """The image interval that positions [lo, hi) read under ``mode`` (empty if none)."""
    if hi <= lo:
        return (0, 0)
    if mode == "constant" or (lo >= 0 and hi <= n):
        a, b = max(lo, 0), min(hi, n)
        return (a, b) if a < b else (0, 0)
    if mode == "circular":
        return (0, n)
    idx = _map_index(torch.arange(lo, hi), n, mode)
    return int(idx.min()), int(idx.max()) + 1


def source_box(box: Box, extent: tuple[int, ...], mode: str) -> Box:
    return Box.from_dims(source_range(a, b, n, mode) for a, b, n in zip(box.lo, box.hi, extent))


def read(value: Value, box: Box, extent: tuple[int, ...], mode: str = "constant", fill: float = 0.0):
    """The values of ``box`` (which may reach outside ``extent``), padded as ``mode`` says."""
    tensor, have = value
    inside = box.clip(extent)
    if inside == box:
        return tensor[(slice(None), slice(None)) + inside.relative_to(have).slices()]
    if inside.empty and mode == "constant":
        return tensor.new_full(tensor.shape[:2] + box.shape, fill)
    if mode == "constant":
        crop = tensor[(slice(None), slice(None)) + inside.relative_to(have).slices()]
        return _Pad.apply(crop, inside.relative_to(box), box.shape, fill)
    out = tensor
    for d in range(box.ndim):
        idx = _map_index(torch.arange(box.lo[d], box.hi[d]), extent[d], mode) - have.lo[d]
        out = out.index_select(2 + d, idx.to(out.device))
    return out


class _Pad(torch.autograd.Function):
    """Constant padding that fills only the border: ``F.pad`` fills the whole result first, which
    costs as much again as the copy, on every tile at the image border and for every layer."""

    @staticmethod
    def forward(ctx, crop: torch.Tensor, where: Box, shape: tuple[int, ...], fill: float):
        out = crop.new_empty(crop.shape[:2] + tuple(shape))
        out[(slice(None), slice(None)) + where.slices()] = crop
        for d in range(where.ndim):  # the slabs below and above the crop, one dimension at a time
            lo, hi = where.dim(d)
            for a, b in ((0, lo), (hi, shape[d])):
                if a < b:
                    index = [slice(None)] * (2 + where.ndim)
                    index[2 + d] = slice(a, b)
                    for e in range(d):  # earlier dimensions' slabs are filled already
                        index[2 + e] = slice(*where.dim(e))
                    out[tuple(index)] = fill
        ctx.where = where
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[(slice(None), slice(None)) + ctx.where.slices()], None, None, None


def _map_index(i: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    if mode == "replicate":
        return i.clamp(0, n - 1)
    if mode == "circular":
        return i.remainder(n)
    if mode == "reflect":
        i = torch.where(i < 0, -i, i)
        return torch.where(i >= n, 2 * (n - 1) - i, i)
    raise ValueError(f"unknown padding mode {mode!r}; expected one of {MODES}")
