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
import torch.nn.functional as F

from .box import Box

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
        pads = []
        for d in reversed(range(box.ndim)):
            pads += [inside.lo[d] - box.lo[d], box.hi[d] - inside.hi[d]]
        return F.pad(crop, pads, value=fill)
    out = tensor
    for d in range(box.ndim):
        idx = _map_index(torch.arange(box.lo[d], box.hi[d]), extent[d], mode) - have.lo[d]
        out = out.index_select(2 + d, idx.to(out.device))
    return out


def _map_index(i: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    if mode == "replicate":
        return i.clamp(0, n - 1)
    if mode == "circular":
        return i.remainder(n)
    if mode == "reflect":
        i = torch.where(i < 0, -i, i)
        return torch.where(i >= n, 2 * (n - 1) - i, i)
    raise ValueError(f"unknown padding mode {mode!r}; expected one of {MODES}")
