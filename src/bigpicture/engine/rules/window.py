"""Convolution and pooling: window ops, padded at the image border as PyTorch pads the whole image."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bigpicture.engine.box import Box
from bigpicture.engine.padding import Value, read
from bigpicture.engine.rules import Window, _bind, _bind_values, _same_padding, _tuple, rule
from bigpicture.engine.rules.unpool import image_indices

_CONV_ARGS = ["weight", "bias", "stride", "padding", "dilation", "groups"]
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


class NativePadding:
    """A window op that pads the image border with its own ``padding=`` argument instead of reading a
    padded copy of its input: for a whole-image tile (a later stage's) every layer would copy its
    input once more. The border a tile's box reaches outside the image may differ below and above,
    and PyTorch's padding is the same on both sides: we pad both by the larger, rounded so that the
    extra positions below are whole output steps, and drop the outputs they add."""

    def pads_natively(self, cpu: bool) -> bool:
        """Whether this op pads the border with its own ``padding=`` (``padded_natively``) on a CPU
        (``cpu``) or another device; the performance model reads it too, to charge no padded copy."""
        return True

    def native_padding(self, pad) -> bool:
        return True

    def native_pads(self, out: Box) -> tuple[Box, tuple, tuple]:
        """(the part of ``out``'s input box inside the image, the padding passed to the op on both
        sides, the outputs it adds below that are dropped) per dimension."""
        box = self.padded_box(out)
        inside = box.clip(self.in_extents[0])
        pad, skip = [], []
        for d in range(self.nd):
            below, above = inside.lo[d] - box.lo[d], box.hi[d] - inside.hi[d]
            steps = -(-max(above - below, 0) // self.step[d])  # whole output steps added below
            pad.append(below + steps * self.step[d])
            skip.append(steps)
        return inside, tuple(pad), tuple(skip)

    def crops(self, out: Box, cpu: bool = True) -> tuple[bool, ...]:
        """Per dimension, whether ``padded_natively`` drops outputs the symmetric padding adds there:
        its result is then a strided view of a larger output (the performance model charges what
        reads it so: PyTorch's CPU BatchNorm takes a slower path on a strided input; hence on a CPU
        by default, the only device whose rates tell a strided input apart)."""
        inside, pad, _ = self.native_pads(out)
        if not self.pads_natively(cpu) or inside.empty or not self.native_padding(pad):
            return (False,) * self.nd
        made = [
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(inside.shape, pad, self.dilation, self.kernel, self.step, strict=True)
        ]
        return tuple(m != n for m, n in zip(made, out.shape, strict=True))

    def padded_natively(self, out: Box, value: Value, call, fill: float = 0.0):
        """``call(input, padding)`` on ``value``'s part of ``out``'s input box, padded as the op pads."""
        inside, pad, skip = self.native_pads(out)
        if inside.empty or not self.native_padding(pad):
            return call(read(value, self.padded_box(out), self.in_extents[0], self.mode, fill), 0)
        tensor, have = value
        y = call(tensor[(slice(None), slice(None)) + inside.relative_to(have).slices()], pad)
        if any(skip) or tuple(y.shape[2:]) != out.shape:
            y = y[(slice(None), slice(None)) + tuple(slice(k, k + n) for k, n in zip(skip, out.shape))]
        return y


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, F.conv1d, F.conv2d, F.conv3d)
class Conv(NativePadding, Window):
    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        n = self.nd
        if node.op == "call_module":
            m = ctx.module(node)
            kernel, stride, padding, dilation = m.kernel_size, m.stride, m.padding, m.dilation
            self.groups, self.module, self.cin_per_group = m.groups, m, m.weight.shape[1]
            self.mode = {"zeros": "constant"}.get(m.padding_mode, m.padding_mode)
        else:
            a = ctx.static(_bind(node, ctx, _CONV_ARGS, _CONV_DEFAULTS))
            weight = ctx.shape(node.args[1] if len(node.args) > 1 else node.kwargs["weight"])
            kernel, self.cin_per_group = tuple(weight[2:]), weight[1]
            stride, padding, dilation, self.groups = a["stride"], a["padding"], a["dilation"], a["groups"]
            self.module = None
        self.kernel, self.step, self.dilation = _tuple(kernel, n), _tuple(stride, n), _tuple(dilation, n)
        if padding == "same":
            self.pad_lo, _ = _same_padding(self.kernel, self.dilation)
        elif padding == "valid":
            self.pad_lo = (0,) * n
        else:
            self.pad_lo = _tuple(padding, n)

    def weights(self, args, kwargs):
        if self.module is not None:
            return self.module.weight, self.module.bias
        a = _bind_values(args, kwargs, _CONV_ARGS, _CONV_DEFAULTS)
        return a["weight"], a["bias"]

    def run(self, out, args, kwargs):
        weight, bias = self.weights(args, kwargs)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.nd - 1]
        if self.pads_natively(args[0].tensor.device.type == "cpu"):
            return self.padded_natively(out, args[0], lambda x, p: conv(x, weight, bias, self.step, p,
                                                                         self.dilation, self.groups))
        return conv(self.read(out, args[0]), weight, bias, self.step, 0, self.dilation, self.groups)

    def pads_natively(self, cpu: bool) -> bool:
        """Zeros at the border: the convolution's own padding, no padded copy; except 3D on a CPU,
        where PyTorch's im2col kernel (``Slow3d``, its choice for 3D inputs of up to 20,480
        channels x depth x height) tests every position against the padding in its inner loop and
        ran natively padded 3x3x3 convolutions 1.2-2x slower forward and 1.3-1.8x backward here
        than on a padded copy, and a natively padded call's smaller input can keep a convolution
        there that the copy moves to oneDNN (32 -> 32 channels at 24^3: 4.8x). oneDNN's own 3D
        convolutions ran natively padded 0-13% faster, which this gives up at the image border on
        a CPU; 1D and 2D ones (oneDNN almost always) within noise of the copy, so native."""
        return self.mode == "constant" and not (cpu and self.nd == 3)

    def flops(self, out, channels):
        return 2 * out.numel * channels * math.prod(self.kernel) * self.cin_per_group


_MAXPOOL_ARGS = ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
_MAXPOOL_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}
_AVGPOOL_ARGS = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
_AVGPOOL_DEFAULTS = {
    "stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None,
}  # fmt: skip


class Pool(Window):
    def configure(self, ctx, a):
        n = self.nd
        self.kernel = _tuple(a["kernel_size"], n)
        self.step = _tuple(a["stride"] or a["kernel_size"], n)
        self.pad_lo = _tuple(a["padding"], n)
        self.dilation = _tuple(a.get("dilation", 1), n)

    def arguments(self, node, ctx, names, defaults):
        if node.op == "call_module":
            m = ctx.module(node)
            return {k: getattr(m, k, defaults.get(k)) for k in ["kernel_size"] + list(defaults)}
        return ctx.static(_bind(node, ctx, names, defaults))

    def flops(self, out, channels):
        return out.numel * channels * math.prod(self.kernel)


_WITH_INDICES = (F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices)


@rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, *_WITH_INDICES)
class MaxPool(NativePadding, Pool):
    """With ``return_indices``: (values, the flat position of each maximum in the image plane)."""

    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        a = self.arguments(node, ctx, _MAXPOOL_ARGS, _MAXPOOL_DEFAULTS)
        self.configure(ctx, a)
        self.indices = bool(a["return_indices"]) or node.target in _WITH_INDICES

    def run(self, out, args, kwargs):
        if self.pads_natively(args[0].tensor.device.type == "cpu"):
            pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[self.nd - 1]
            return self.padded_natively(out, args[0], lambda x, p: pool(x, self.kernel, self.step, p,
                                                                         self.dilation), -math.inf)
        x = self.read(out, args[0], -math.inf)
        values, local = _WITH_INDICES[self.nd - 1](x, self.kernel, self.step, 0, self.dilation)
        return values, image_indices(local, self.padded_box(out), self.in_extents[0])

    def pads_natively(self, cpu: bool) -> bool:
        """Without indices (those are in the padded box's coordinates, ``image_indices``)."""
        return not self.indices

    def native_padding(self, pad) -> bool:
        """PyTorch pads a max pooling by at most half its kernel (with -inf, as the image border needs)."""
        return all(2 * p <= k for p, k in zip(pad, self.kernel))


@rule(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
class AvgPool(Pool):
    """Window sums with zero padding, divided by PyTorch's divisor at each image position."""

    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        a = self.arguments(node, ctx, _AVGPOOL_ARGS, _AVGPOOL_DEFAULTS)
        self.configure(ctx, a)
        self.count_include_pad, self.divisor_override = a["count_include_pad"], a["divisor_override"]

    def run(self, out, args, kwargs):
        x = self.read(out, args[0])
        if self.nd == 1:
            sums = F.avg_pool2d(x.unsqueeze(2), (1,) + self.kernel, (1,) + self.step, divisor_override=1)
            sums = sums.squeeze(2)
        else:
            pool = (F.avg_pool2d, F.avg_pool3d)[self.nd - 2]
            sums = pool(x, self.kernel, self.step, divisor_override=1)
        if self.divisor_override:
            return sums / self.divisor_override
        divisor = torch.ones((), dtype=torch.int64)
        for d in range(self.nd):
            i = torch.arange(out.lo[d], out.hi[d])
            start, n, p = i * self.step[d] - self.pad_lo[d], self.in_extents[0][d], self.pad_lo[d]
            end = torch.clamp(start + self.kernel[d], max=n + p)
            count = end - start if self.count_include_pad else end.clamp(max=n) - start.clamp(min=0)
            divisor = divisor.unsqueeze(-1) * count
        return sums / divisor.to(sums.device)
