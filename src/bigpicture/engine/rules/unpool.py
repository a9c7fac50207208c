"""Max pooling's indices and max unpooling: positions in image coordinates.

``MaxPool(return_indices=True)`` returns, per output pixel, the flat position of its maximum in
the pool's input plane; ``MaxUnpool`` writes each value back there (SegNet, MONAI's Quicknat). On
a tile, the pool sees only its read box, so its indices are positions in that box: they are made
positions in the image (``image_indices``), the same numbers the untiled pool gives. The tile
scans each window in the same order as the whole image, so ties (the zeros after a ReLU) pick
the same first maximum, and the values and the gradient go where the untiled ones go.

    pool input   |......|rrrrrrrrrrrr|......|    tile read box r, index i in it
    image index  = (i unravelled in r) + r.lo, ravelled in the image's extent

An unpool output box needs the pool outputs whose windows overlap it (as a transposed
convolution's input); their values land where their indices say, if inside the box.
"""

from __future__ import annotations

import math
import operator
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from bigpicture.engine.box import Box
from bigpicture.engine.padding import read
from bigpicture.engine.rules import Op, _bind_values, lookup, rule
from bigpicture.engine.rules.resample import scattering
from bigpicture.errors import TilingError

_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices,
)  # fmt: skip
_UNPOOL_ARGS = ["indices", "kernel_size", "stride", "padding", "output_size"]


def image_indices(local: torch.Tensor, box: Box, extent: tuple[int, ...]) -> torch.Tensor:
    """Flat positions in ``box`` (row-major over its shape) as flat positions in the image ``extent``."""
    return _ravel([c + lo for c, lo in zip(_unravel(local, box.shape), box.lo)], extent)


def _unravel(flat: torch.Tensor, shape) -> list[torch.Tensor]:
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = flat // size
    return coords[::-1]


def _ravel(coords, shape) -> torch.Tensor:
    flat = torch.zeros_like(coords[0])
    for c, n in zip(coords, shape):
        flat = flat * n + c
    return flat


@rule(nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d, F.max_unpool1d, F.max_unpool2d, F.max_unpool3d)
class MaxUnpool(Op):
    """Output box [a, b) needs the pooled pixels i whose window [i*s - p, i*s - p + d*(k-1)] meets it:
    the window of the max pool that made the indices, found in the graph."""

    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        pool = _pool_of(node, ctx)
        self.kernel, self.step, self.pad, self.dilation = pool.kernel, pool.step, pool.pad_lo, pool.dilation
        if pool.in_extents[0] != self.extent:
            raise TilingError(
                f"{ctx.where(node)}: {self.name} writes a plane of {self.extent} positions with indices of "
                f"{ctx.where(pool.node)}, whose input plane is {pool.in_extents[0]}; the flat indices then "
                "mean other positions. Give output_size= the pool's input size."
            )

    @property
    def stride(self):
        return tuple(Fraction(1, s) for s in self.step)

    def needs(self, out):
        box = scattering(out, self.kernel, self.step, self.pad, self.dilation, self.in_extents[0])
        return [box] * len(self.inputs)  # the values and their indices

    def run(self, out, args, kwargs):
        box = self.needs(out)[0]
        values = read(args[0], box, self.in_extents[0])
        indices = read(_bind_values(args, kwargs, _UNPOOL_ARGS, {})["indices"], box, self.in_extents[0])
        n, c = values.shape[:2]
        coords = _unravel(indices, self.extent)
        inside = torch.ones_like(indices, dtype=torch.bool)
        for x, lo, hi in zip(coords, out.lo, out.hi):
            inside &= (x >= lo) & (x < hi)
        local = _ravel([x - lo for x, lo in zip(coords, out.lo)], out.shape)
        size = math.prod(out.shape)
        local = torch.where(inside, local, size)  # the values of other tiles go to a slot dropped after
        flat = values.new_zeros(n, c, size + 1).scatter(2, local.reshape(n, c, -1), values.reshape(n, c, -1))
        return flat[:, :, :size].reshape(n, c, *out.shape)


def _pool_of(node, ctx):
    """The max pool (its ``MaxPool`` rule) whose indices ``node`` unpools: ``pool(x)[1]``."""
    indices = node.args[1] if len(node.args) > 1 else node.kwargs.get("indices")
    pool = indices.args[0] if getattr(indices, "target", None) is operator.getitem else None
    if pool is not None and indices.args[1] == 1 and ctx.roles.get(pool) == "spatial":
        key = type(ctx.module(pool)) if pool.op == "call_module" else pool.target
        if key in _POOLS:
            return lookup(pool, ctx)  # window.MaxPool
    raise TilingError(
        f"{ctx.where(node)}: {ctx.op_name(node)} places values at indices that do not come straight from a "
        "max pool of the tiled part (`values, indices = pool(x)`); bigpicture can only tell where "
        "such indices point. Unpool the indices of a MaxPool(return_indices=True) as they are."
    )
