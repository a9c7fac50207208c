"""One tile, node by node: the memory and time of each step of the tile interpreter.

For a tile, every spatial node computes its box (``plan.needs``). This module turns that into

    Step      per node: bytes of its new value (none for views and in-place ops), the padded
              copy of its input at the image border, what autograd saves of it, its work
    TileWalk  the walk over the steps in ``split.order``, as ``execute.Runner.run_tile`` runs
              them: values freed at their last use, sinks kept (the tile returns views of them);
              for training also the recompute with grad (saved values stay) and the backward
              in reverse order (gradient buffers live from their first user to their node)

What autograd saves follows PyTorch's derivative formulas: a convolution or pooling saves its
input (max pooling also int64 indices), normalisation and most activations save their input,
ReLU / sigmoid / tanh / softmax save their output, and additions, concatenations, padding and
interpolation save nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bigpicture.engine.box import Box
from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose, Pad, Resample, Slice
from bigpicture.engine.rules.window import AvgPool, Conv, MaxPool, Pool
from bigpicture.engine.split import Split
from bigpicture.perf.fusion import fuse
from bigpicture.perf.rates import PARALLEL_ELEMENTS, Rates, conv_backend

# fmt: off
_VIEWS = {"identity", "dropout", "dropout1d", "dropout2d", "dropout3d", "alphadropout", "featurealphadropout",
          "getitem", "chunk", "split", "contiguous", "to", "float", "type_as", "double", "half", "bfloat16"}
_SAVE_NOTHING = {"add", "sub", "neg", "cat", "concat", "concatenate", "iadd", "isub", "clone", "mean", "sum",
                 "identity"}
_SAVE_OUTPUT = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "log_softmax",
                "logsoftmax", "elu", "selu", "celu", "exp", "sqrt", "rsqrt", "softmax2d"}
_BINARY = {"add", "sub", "mul", "div", "truediv", "iadd", "isub", "imul", "itruediv", "maximum", "minimum",
           "where", "pow"}
_INPLACE = {"iadd", "isub", "imul", "itruediv"}
_COPY = {"cat", "concat", "concatenate", "clone", "pixelshuffle", "pixelunshuffle"}
_NORM = {"batchnorm1d", "batchnorm2d", "batchnorm3d", "syncbatchnorm", "batch_norm", "instancenorm1d",
         "instancenorm2d", "instancenorm3d"}
# fmt: on


@dataclass
class Step:
    node: object
    inputs: tuple  # spatial input nodes
    out: int  # bytes of the new value; 0 if it is a view of (or written into) inputs[0]
    temp: int = 0  # bytes it holds only while it runs: padded input, workspace
    padded: int = 0  # of which the padded copy of its input (what autograd saves, if it saves inputs)
    saves_inputs: bool = False
    saves_output: bool = False
    saved_extra: int = 0  # e.g. max pooling's indices
    aliases: bool = False  # a view of inputs[0], or written into it: no new value (out == 0)
    keeps_padded: bool = False  # autograd keeps its padded input copy (``padded``), not its inputs
    kind: str = "unary"
    flops: int = 0
    bytes: int = 0
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    flops_bwd: int = 0


def _step(
    split: Split, node, box: Box, copied: bool, need: dict, item: int, rates: Rates, grad_in: bool
) -> Step:
    """The step of one node computing ``box``. ``copied``: its input is copied first, padded (its
    window reaches out of the image) or made contiguous (it reads a sub-box of a bigger value)."""
    outside = copied and _outside(split.ops[node], box)
    op, shape = split.ops[node], split.shapes[node]
    n, c = shape[0], shape[1]
    elems = n * c * box.numel
    ins = tuple(op.inputs)
    in_bytes = sum(math.prod(split.shapes[i][:2]) * need[i].numel * item for i in ins if i in need)
    name, inplace, _ = _facts(split, node)
    view = name in _VIEWS or isinstance(op, Slice) or (isinstance(op, Pad) and not outside)
    st = Step(node, ins, 0 if (view or inplace) else elems * item, aliases=view or inplace)
    st.bytes = in_bytes + elems * item
    pad_copy = 0
    if isinstance(op, Window) and copied:  # a Pad op's padded copy is its own output
        pad_copy = st.temp = math.prod(split.shapes[ins[0]][:2]) * op.padded_box(box).numel * item
        st.padded = pad_copy if outside else 0  # autograd saves the padded copy, not a contiguous one
        st.keeps_padded = bool(st.padded)
    if isinstance(op, (Conv, ConvTranspose)):
        st.kind, st.saves_inputs, stride = "conv", True, max(op.step)
        if isinstance(op, Conv):
            fan_in, positions, transposed = op.cin_per_group * math.prod(op.kernel), n * box.numel, False
        else:  # every input position scatters cin x cout/groups x kernel multiply-adds
            fan_in, positions, transposed = split.shapes[ins[0]][1] * math.prod(op.kernel), n, True
            positions *= op.needs(box)[0].numel
        st.flops = 2 * positions * fan_in * c // (op.groups if transposed else 1)
        cin = split.shapes[ins[0]][1]
        read = n * cin * (op.padded_box(box) if not transposed else op.needs(box)[0]).numel * item
        # the column matrix: input channels x kernel per output position (a transposed convolution
        # scatters output channels x kernel per input position)
        im2col = n * (c * positions // n if transposed else cin * box.numel) * math.prod(op.kernel) * item
        st.temp += rates.workspace(split.nd, max(read, st.out), im2col)
        backend = _backend(op, box, n, cin, c, transposed, rates)
        case = {"transposed": transposed, "cin": cin // (1 if transposed else op.groups),
                "kernel": math.prod(op.kernel), "backend": backend}  # fmt: skip
        st.fwd_s = st.flops / rates.conv(split.nd, fan_in, c, positions, stride, **case)
        st.flops_bwd = st.flops * (2 if grad_in else 1)
        st.bwd_s = st.flops_bwd / rates.conv(split.nd, fan_in, c, positions, stride, backward=True, **case)
    elif isinstance(op, Pool):
        window = elems * math.prod(op.kernel)
        st.kind, st.saves_inputs = "pool", True
        st.saved_extra = elems * 8 if isinstance(op, MaxPool) else 0
        if isinstance(op, AvgPool):
            st.temp += elems * item  # window sums, then divided
        st.fwd_s = max(window / rates.pool(window), st.bytes / rates.stream("unary", st.bytes))
        st.bwd_s = max(window / rates.pool(window, True), 2 * st.bytes / rates.stream("unary", 2 * st.bytes))
    elif view and not inplace:
        st.kind = "view"
    else:
        st.kind = _stream_kind(op, name)
        st.saves_output = name in _SAVE_OUTPUT
        st.saves_inputs = (
            not st.saves_output and name not in _SAVE_NOTHING and not isinstance(op, (Pad, Resample))
        )
        st.fwd_s = st.bytes / rates.stream(st.kind, st.bytes)
        moved = 3 * elems * item if (st.saves_inputs or st.saves_output) else 0
        st.bwd_s = moved / rates.stream(st.kind, moved, backward=True) if moved else 0.0
    if pad_copy:
        st.fwd_s += 2 * pad_copy / rates.stream("copy", 2 * pad_copy)
    if st.kind != "view" and elems >= PARALLEL_ELEMENTS:  # it runs on every thread: wakes them first
        st.fwd_s += rates.wake_s
        st.bwd_s += rates.wake_s if st.bwd_s else 0.0
    if getattr(rates, "fused", False):  # compiled tiles: memory-bound chains fused (perf/fusion.py)
        fuse(split, node, st)
    return st


def _backend(op, box: Box, n: int, cin: int, cout: int, transposed: bool, rates: Rates) -> str | None:
    """The kernel family torch will run this convolution with on the CPU (`rates.conv_backend`)."""
    if rates.gpu or not rates.measured:
        return None
    if transposed:
        shape, weight = op.needs(box)[0].shape, (cin, cout // op.groups) + tuple(op.kernel)
    else:
        shape, weight = op.padded_box(box).shape, (cout, cin // op.groups) + tuple(op.kernel)
    return conv_backend((n, cin) + tuple(shape), weight, tuple(op.step), tuple(op.dilation), op.groups,
                        transposed, rates.dtype)  # fmt: skip


def _stream_kind(op, name: str) -> str:
    if name in _COPY or isinstance(op, (Pad, Resample)):
        return "copy"
    if name == "prelu":  # its weight gradient reduces over the tile: calibrated on its own
        return "prelu"
    return "norm" if name in _NORM else "binary" if name in _BINARY else "unary"


def _module(split: Split, node):
    return split.gm.get_submodule(node.target) if node.op == "call_module" else None


def _stored(split: Split, inputs: list, need: dict, input_copy: bool) -> Box:
    """The box of the value a node's first input is stored as: the whole image for an input that
    lives on the device (a tile's input is a view of it)."""
    first = inputs[0] if inputs else split.input
    if first is split.input and not input_copy:
        return Box.from_shape(split.extents[split.input])
    return need[first]


def _outside(op, box: Box) -> bool:
    padded = op.padded_box(box)
    return min(padded.lo) < 0 or any(h > n for h, n in zip(padded.hi, op.in_extents[0], strict=True))


def node_step(
    split: Split, node, need: dict, grad_in: bool, input_copy: bool, item: int, rates: Rates, memo: dict
) -> Step:
    """The step of ``node`` computing ``need[node]`` (its inputs computing theirs), from ``memo``
    when an earlier tile had the same geometry (``dim_geometry`` in every dimension)."""
    stored = _stored(split, spatial_inputs(split, node, need), need, input_copy)
    key = step_key(node, [dim_geometry(split, node, need, stored, d) for d in range(split.nd)], grad_in)
    if key not in memo:
        copied = key[1] or key[2]
        memo[key] = _step(split, node, need[node], copied, need, item, rates, grad_in)
    return memo[key]


def spatial_inputs(split: Split, node, need: dict) -> list:
    """The inputs of ``node`` that the tile computes (or the image): the first is what it reads."""
    return [i for i in split.ops[node].inputs if i is split.input or (i in need and not need[i].empty)]


def dim_geometry(split: Split, node, need: dict, stored: Box, d: int) -> tuple:
    """What the step of ``node`` depends on along dimension d: the lengths of its box and of its
    inputs' boxes, whether its window reaches out of the image (padded there), whether it reads a
    sub-box of its stored input (convolution and pooling kernels copy a strided input first), and
    a transposed convolution's input length. A tile's step is a function of these, per dimension."""
    op, box = split.ops[node], need[node]
    lengths = (box.shape[d],) + tuple(need[i].shape[d] for i in op.inputs if i in need)
    outside = differ = False
    if isinstance(op, (Window, Pad)):
        padded = op.padded_box(box)
        outside = padded.lo[d] < 0 or padded.hi[d] > op.in_extents[0][d]
        differ = isinstance(op, Window) and padded.dim(d) != stored.dim(d)
    extra = op.needs(box)[0].shape[d] if isinstance(op, ConvTranspose) else 0
    return lengths, outside, differ, extra


def step_key(node, dims: list[tuple], grad_in: bool) -> tuple:
    """The memo key of a step from its geometry in every dimension: (node, shapes, outside, strided, ...)."""
    shapes = tuple(zip(*(g[0] for g in dims), strict=True))
    outside = any(g[1] for g in dims)
    strided = not outside and any(g[2] for g in dims)
    return node, outside, strided, shapes, tuple(g[3] for g in dims), grad_in


def _facts(split: Split, node) -> tuple[str, bool, bool]:
    """(name, in place, has trainable parameters) of a node; kept in its meta, as fx passes do."""
    if "bigpicture_facts" not in node.meta:
        op, module = split.ops[node], _module(split, node)
        name = op.name.rsplit(".", 1)[-1].lower()
        inplace = getattr(module, "inplace", False) or name.endswith("_") or name in _INPLACE
        if module is not None:
            params = any(p.requires_grad for p in module.parameters())
        else:
            params = any(split.roles.get(i) == "const" for i in node.all_input_nodes)
        node.meta["bigpicture_facts"] = (name, bool(inplace), params)
    return node.meta["bigpicture_facts"]
