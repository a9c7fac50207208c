"""Ops that change resolution by other means than a window: transposed convolution, interpolation
(pixel (un)shuffle: ``shuffle``); and ops that shift coordinates: padding and spatial slicing."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from bigpicture.engine.box import Box
from bigpicture.engine.padding import read, source_box
from bigpicture.engine.rules import Op, _bind, _bind_values, _tuple, rule
from bigpicture.errors import TilingError

_CONVT_ARGS = ["weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"]
_CONVT_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}


@rule(
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
)  # fmt: skip
class ConvTranspose(Op):
    """Input i writes output [i*s - p, i*s - p + d*(k-1)]; output_padding rows get the bias only."""

    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        n = self.nd
        if node.op == "call_module":
            m = ctx.module(node)
            self.module = m
            kernel, stride, padding, dilation, self.groups = (
                m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
            )  # fmt: skip
            self.cin = m.in_channels
        else:
            a = ctx.static(_bind(node, ctx, _CONVT_ARGS, _CONVT_DEFAULTS))
            self.module = None
            weight = ctx.shape(node.args[1] if len(node.args) > 1 else node.kwargs["weight"])
            kernel, self.cin = tuple(weight[2:]), weight[0]  # weight: (cin, cout / groups, *kernel)
            stride, padding, dilation, self.groups = a["stride"], a["padding"], a["dilation"], a["groups"]
        self.kernel, self.step = _tuple(kernel, n), _tuple(stride, n)
        self.pad, self.dilation = _tuple(padding, n), _tuple(dilation, n)

    @property
    def stride(self):
        return tuple(Fraction(1, s) for s in self.step)

    def needs(self, out):
        return [scattering(out, self.kernel, self.step, self.pad, self.dilation, self.in_extents[0])]

    def run(self, out, args, kwargs):
        if self.module is not None:
            weight, bias = self.module.weight, self.module.bias
        else:
            a = _bind_values(args, kwargs, _CONVT_ARGS, _CONVT_DEFAULTS)
            weight, bias = a["weight"], a["bias"]
        value = args[0]
        box = self.needs(out)[0]
        x = read(value, box, self.in_extents[0])
        if box.empty:
            y = x.new_zeros(x.shape[:1] + (weight.shape[1] * self.groups,) + out.shape)
        else:
            convt = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.nd - 1]
            y = convt(x, weight, None, self.step, 0, 0, self.groups, self.dilation)
            pads = []
            for d in reversed(range(self.nd)):
                start = box.lo[d] * self.step[d] - self.pad[d]
                pads += [start - out.lo[d], out.hi[d] - (start + y.shape[2 + d])]
            y = F.pad(y, pads)
        if bias is not None:
            y = y + bias.view((1, -1) + (1,) * self.nd)
        return y

    def flops(self, out, channels):
        # every input position the box needs scatters cin x cout/groups x kernel multiply-adds
        # (as torch.utils.flop_counter counts a transposed convolution)
        positions = self.needs(out)[0].numel
        return 2 * positions * self.cin * (channels // self.groups) * math.prod(self.kernel)


def scattering(out: Box, kernel, step, pad, dilation, extent) -> Box:
    """The input positions i whose window [i*s - p, i*s - p + d*(k-1)] meets ``out``: those a
    transposed convolution (or an unpool) scatters into it."""
    dims = []
    for a, b, s, p, d, k, n in zip(out.lo, out.hi, step, pad, dilation, kernel, extent):
        lo, hi = max(-((d * (k - 1) - a - p) // s), 0), min((b - 1 + p) // s + 1, n)
        dims.append((lo, hi) if lo < hi and a < b else (0, 0))
    return Box.from_dims(dims)


_INTERP_ARGS = ["size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias"]
_INTERP_DEFAULTS = {
    "size": None, "scale_factor": None, "mode": "nearest", "align_corners": None,
    "recompute_scale_factor": None, "antialias": False,
}  # fmt: skip


@rule(nn.Upsample, F.interpolate, F.upsample)
class Resample(Op):
    """Nearest and (bi/tri)linear interpolation in image coordinates, with PyTorch's index formulas."""

    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        if node.op == "call_module":
            m = ctx.module(node)
            a = {"scale_factor": m.scale_factor, "mode": m.mode, "align_corners": m.align_corners,
                 "recompute_scale_factor": m.recompute_scale_factor}  # fmt: skip
        else:
            a = ctx.static(_bind(node, ctx, _INTERP_ARGS, _INTERP_DEFAULTS))
        self.mode, self.align_corners = a["mode"], bool(a["align_corners"])
        if self.mode not in ("nearest", "nearest-exact", "linear", "bilinear", "trilinear") or a.get(
            "antialias"
        ):
            raise TilingError(
                f"{ctx.where(node)}: interpolation mode {self.mode!r} has no exact tiled rule yet; "
                "use nearest, nearest-exact or (bi/tri)linear without antialias."
            )
        sizes = list(zip(self.in_extents[0], self.extent))
        given = a["scale_factor"] is not None and not a["recompute_scale_factor"]
        factors = _tuple(a["scale_factor"], self.nd) if given else (None,) * self.nd
        # PyTorch computes the source coordinate in float32 for every float dtype but double.
        self.dtype = torch.float64 if ctx.dtype(node) == torch.float64 else torch.float32
        self.scales = [self._scale(n_in, n_out, f) for (n_in, n_out), f in zip(sizes, factors)]

    def _scale(self, n_in, n_out, factor):
        linear = self.mode not in ("nearest", "nearest-exact")
        if linear and self.align_corners:
            return (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        return 1.0 / factor if factor else n_in / n_out

    @property
    def stride(self):
        return tuple(Fraction(a, b) for a, b in zip(self.in_extents[0], self.extent))

    def sources(self, d, lo, hi):
        """Source rows i0, i1 and the weight of i1 for output rows [lo, hi) of dimension d."""
        n = self.in_extents[0][d]
        scale = torch.tensor(self.scales[d], dtype=self.dtype)
        i = torch.arange(lo, hi).to(self.dtype)
        if self.mode in ("nearest", "nearest-exact"):
            src = torch.floor((i + 0.5) * scale if self.mode == "nearest-exact" else i * scale)
            i0 = src.to(torch.int64).clamp(max=n - 1)
            return i0, i0, None
        src = scale * i if self.align_corners else (scale * (i + 0.5) - 0.5).clamp(min=0)
        i0 = src.to(torch.int64)
        return i0, torch.where(i0 < n - 1, i0 + 1, i0), src - i0

    def needs(self, out):
        dims = []
        for d in range(self.nd):
            if out.hi[d] <= out.lo[d]:
                dims.append((0, 0))
                continue
            i0, i1, _ = self.sources(d, out.lo[d], out.hi[d])
            dims.append((int(i0.min()), int(i1.max()) + 1))
        return [Box.from_dims(dims)]

    def run(self, out, args, kwargs):
        x, have = args[0]
        for d in range(self.nd):
            i0, i1, lam = self.sources(d, out.lo[d], out.hi[d])
            x0 = x.index_select(2 + d, (i0 - have.lo[d]).to(x.device))
            if lam is None:
                x = x0
                continue
            x1 = x.index_select(2 + d, (i1 - have.lo[d]).to(x.device))
            shape = [1] * x.ndim
            shape[2 + d] = -1
            lam = lam.to(x.dtype).to(x.device).view(shape)
            x = x0 * (1 - lam) + x1 * lam
        return x


_PAD_MODES = {"Reflection": "reflect", "Replication": "replicate", "Circular": "circular"}


@rule(
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d, F.pad,
)  # fmt: skip
class Pad(Op):
    """Output row i is input row i - pad_lo; rows outside the image come from the padding mode.

    Pairs beyond the spatial ones pad channels (then the batch): MONAI's ChannelPad widens a
    residual with zero channels. That is pointwise in space, and padding is separable (reflect,
    replicate and circular map each coordinate on its own), so a tile pads its box in space with
    the image's own padding, then its channels as the whole image's are padded."""

    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        if node.op == "call_module":
            m = ctx.module(node)
            pad, self.fill = m.padding, getattr(m, "value", 0.0)
            name = type(m).__name__
            self.mode = next((mode for key, mode in _PAD_MODES.items() if name.startswith(key)), "constant")
        else:
            a = ctx.static(_bind(node, ctx, ["pad", "mode", "value"], {"mode": "constant", "value": None}))
            pad, self.mode, self.fill = a["pad"], a["mode"], a["value"] or 0.0
        pad = tuple(_tuple(pad, 2 * self.nd))
        if len(pad) > 2 * ctx.ndim:
            raise TilingError(f"{ctx.where(node)}: {self.name} pads {len(pad) // 2} dimensions of a "
                              f"{ctx.ndim}-d tensor.")  # fmt: skip
        spatial = pad[: 2 * self.nd] + (0,) * max(0, 2 * self.nd - len(pad))
        self.pad_lo = tuple(spatial[2 * (self.nd - 1 - d)] for d in range(self.nd))
        rest = pad[2 * self.nd :]  # channels, then batch: F.pad's pairs run from the last dimension
        self.rest = (0,) * (2 * self.nd) + rest if any(rest) else None

    def padded_box(self, out):
        return out.shift(tuple(-p for p in self.pad_lo))

    def needs(self, out):
        return [source_box(self.padded_box(out), self.in_extents[0], self.mode)]

    def run(self, out, args, kwargs):
        y = read(args[0], self.padded_box(out), self.in_extents[0], self.mode, self.fill)
        if self.rest is None:
            return y
        value = {"value": self.fill} if self.mode == "constant" else {}
        return F.pad(y, self.rest, mode=self.mode, **value)


class Slice(Op):
    """``x[..., a:b:s]`` on spatial dimensions: output row i is input row a + i*s."""

    def __init__(self, node, ctx, index):
        super().__init__(node, ctx)
        shape = ctx.shape(node.args[0])
        given, index = index, _expand_index(index, len(shape))
        if index is None or not all(isinstance(i, slice) for i in index):
            raise TilingError(
                f"{ctx.where(node)}: indexing [{_index_text(given)}] adds, drops or reorders dimensions of "
                "the (N, C, *spatial) layout; only slices (with a positive step) can be tiled. Index with "
                "slices, or move it after the tiled part."
            )
        self.head = index[:2]
        self.start, self.step = [], []
        for sl, n in zip(index[2:], shape[2:]):
            start, _, step = sl.indices(n)
            if step <= 0:
                raise TilingError(f"{ctx.where(node)}: slice step {step} must be positive.")
            self.start.append(start)
            self.step.append(step)

    @property
    def stride(self):
        return tuple(Fraction(s) for s in self.step)

    def needs(self, out):
        dims = [(s + a * t, s + (b - 1) * t + 1) if a < b else (0, 0)
                for a, b, s, t in zip(out.lo, out.hi, self.start, self.step)]  # fmt: skip
        return [Box.from_dims(dims)]

    def run(self, out, args, kwargs):
        x, have = args[0]
        box = self.needs(out)[0]
        spatial = tuple(slice(a - h, b - h, t) for a, b, h, t in zip(box.lo, box.hi, have.lo, self.step))
        return x[(slice(None), slice(None)) + spatial][self.head]


def _index_text(index) -> str:
    def one(i):
        if isinstance(i, slice):
            return ":".join("" if v is None else str(v) for v in (i.start, i.stop, i.step)).rstrip(":") or ":"
        return "..." if i is Ellipsis else "tensor" if isinstance(i, torch.Tensor) else str(i)

    return ", ".join(one(i) for i in (index if isinstance(index, tuple) else (index,)))


def _expand_index(index, ndim):
    """A tuple of one entry per dimension, or None where the index has None or tensors."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is None or isinstance(i, torch.Tensor) for i in index):
        return None
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (ndim - len(index) + 1) + index[k + 1 :]
    return index + (slice(None),) * (ndim - len(index))
