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
from dataclasses import dataclass, field

import torch

from bigpicture.engine.box import Box
from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose, Pad, Resample, Slice
from bigpicture.engine.rules.window import AvgPool, Conv, MaxPool, Pool
from bigpicture.engine.split import Split
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
    st = Step(node, ins, 0 if (view or inplace) else elems * item)
    st.bytes = in_bytes + elems * item
    pad_copy = 0
    if isinstance(op, Window) and copied:  # a Pad op's padded copy is its own output
        pad_copy = st.temp = math.prod(split.shapes[ins[0]][:2]) * op.padded_box(box).numel * item
        st.padded = pad_copy if outside else 0  # autograd saves the padded copy, not a contiguous one
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


@dataclass
class TileWalk:
    """One tile's peak bytes (inference, training) and seconds, with nothing of the tile allocated."""

    peak: int = 0
    peak_train: int = 0
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    flops_fwd: int = 0
    flops_bwd: int = 0
    nodes: int = 0
    ops: int = 0
    fwd_by_kind: dict = field(default_factory=dict)
    bwd_by_kind: dict = field(default_factory=dict)


def walk(
    split: Split,
    need: dict,
    writes: tuple,
    dtype: torch.dtype,
    rates: Rates,
    training: bool,
    input_grad: bool = False,
    input_copy: bool = True,
    memo: dict | None = None,
) -> TileWalk:
    """Walk one tile whose nodes compute the boxes ``need`` and whose sinks write ``writes``.

    ``memo`` keeps steps between walks of one split, rates and dtype: tiles share most node boxes.
    """
    item = torch.empty((), dtype=dtype).element_size()
    x, memo = split.input, {} if memo is None else memo
    grad = {x: input_grad}
    steps, sizes = [], {x: math.prod(split.shapes[x][:2]) * need[x].numel * item}
    for node in split.order:
        if split.roles[node] != "spatial" or node is x or need[node].empty:
            continue
        ins = [i for i in split.ops[node].inputs if i in grad]
        grad_in = any(grad[i] for i in ins)
        grad[node] = grad_in or _facts(split, node)[2]
        op, box = split.ops[node], need[node]
        outside = isinstance(op, (Window, Pad)) and _outside(op, box)
        # convolution and pooling kernels copy a strided input (a sub-box of a bigger value) first
        strided = (
            isinstance(op, Window)
            and not outside
            and op.padded_box(box) != _stored(split, ins, need, input_copy)
        )
        key = (node, box.shape, outside, strided, grad_in)
        if key not in memo:
            memo[key] = _step(split, node, box, outside or strided, need, item, rates, grad_in)
        st = memo[key]
        steps.append(st)
        sizes[node] = math.prod(split.shapes[node][:2]) * need[node].numel * item
    result = TileWalk(nodes=len(steps), ops=sum(s.kind != "view" for s in steps))
    for st in steps:
        result.fwd_s += st.fwd_s
        result.flops_fwd += st.flops
        result.fwd_by_kind[st.kind] = result.fwd_by_kind.get(st.kind, 0.0) + st.fwd_s
    crop = sizes[x] if input_copy else 0
    sinks = [k for k in split.sinks if k in sizes or k is x]
    hold = sum(sizes.get(k, 0) for k in sinks)  # the previous tile's sinks, alive until this one returns
    result.peak, _ = _forward(split, steps, sizes, crop + hold, training=False)
    if training:
        fwd_peak, state = _forward(split, steps, sizes, crop + hold, training=True, grad=grad)
        # the tile's loss terms: each sink's write box times its gradient, summed
        terms = max(
            (
                math.prod(split.shapes[k][:2]) * w.numel * item
                for k, w in zip(split.sinks, writes, strict=False)
            ),
            default=0,
        )
        bwd_peak = _backward(steps, sizes, state, grad) + terms
        result.peak_train = max(fwd_peak, bwd_peak)
        for st in steps:
            if grad[st.node]:
                result.bwd_s += st.bwd_s
                result.flops_bwd += st.flops_bwd
                result.bwd_by_kind[st.kind] = result.bwd_by_kind.get(st.kind, 0.0) + st.bwd_s
        result.bwd_s += _accumulation_s(split, steps, sizes, grad, rates, result.bwd_by_kind)
    return result


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


def _forward(split: Split, steps: list, sizes: dict, base: int, training: bool, grad: dict | None = None):
    """Peak bytes of one forward over the tile; with ``training``, what stays saved at its end."""
    owner, refs, saved = {split.input: split.input}, {split.input: 1}, {}
    last = {}
    for st in steps:
        for i in st.inputs:
            last[i] = st.node
    live = peak = base
    held = set(split.sinks)
    for st in steps:
        node = st.node
        alias = st.out == 0 and st.inputs and st.inputs[0] in owner
        owner[node] = owner[st.inputs[0]] if alias else node
        refs[owner[node]] = refs.get(owner[node], 0) + 1
        peak = max(peak, live + st.out + st.temp + st.saved_extra)
        live += st.out
        if training and grad[node]:
            if st.saves_inputs:
                if st.padded:
                    live += st.padded  # the padded copy is what autograd keeps
                else:
                    for i in st.inputs:
                        saved[owner[i]] = saved.get(owner[i], 0) + 1
            if st.saves_output:
                saved[owner[node]] = saved.get(owner[node], 0) + 1
            live += st.saved_extra
        for i in st.inputs:
            if last.get(i) is node and i not in held:
                o = owner[i]
                refs[o] -= 1
                if refs[o] == 0 and o not in saved and o is not split.input:
                    live -= sizes.get(o, 0) if o in sizes else 0
    return peak, (live, owner, saved, split.input)


def _backward(steps: list, sizes: dict, state, grad: dict) -> int:
    """Peak bytes of the backward of one tile, from the end of its recompute."""
    live, owner, saved, x = state
    peak = live
    buffers: dict = {}
    for st in reversed(steps):
        node = st.node
        if not grad[node]:
            continue
        buffers.setdefault(node, sizes[node])
        new = sum(sizes[i] for i in st.inputs if grad.get(i))
        peak = max(peak, live + sum(buffers.values()) + new + st.temp)
        for i in st.inputs:
            if grad.get(i):
                buffers[i] = sizes[i]
        buffers.pop(node)
        released = [owner[node]] if st.saves_output else []
        if st.saves_inputs and not st.padded:
            released += [owner[i] for i in st.inputs]
        for o in set(released):
            saved[o] -= 1
            if saved[o] == 0 and o is not x:
                live -= sizes[o]
        live -= st.saved_extra + (st.padded if st.saves_inputs else 0)
    return peak


def _accumulation_s(split: Split, steps: list, sizes: dict, grad: dict, rates: Rates, by_kind: dict) -> float:
    """Gradients of a value read by several nodes are summed: one add per extra reader."""
    readers: dict = {}
    for st in steps:
        for i in st.inputs:
            if grad.get(i):
                readers[i] = readers.get(i, 0) + 1
    seconds = sum(
        (r - 1) * 3 * sizes[i] / rates.stream("binary", 3 * sizes[i]) for i, r in readers.items() if r > 1
    )
    by_kind["binary"] = by_kind.get("binary", 0.0) + seconds
    return seconds


def last_tile(split: Split, lay) -> tuple[dict, tuple]:
    """The node boxes and write boxes of the grid's last tile (``grid.Layout``): the engine runs it
    last in the forward with autograd and keeps its graph, so a training step does not recompute it."""
    from bigpicture.engine.plan import _write_box
    from bigpicture.engine.regions import needs

    index = tuple(g - 1 for g in lay.grid)
    writes = tuple(
        _write_box(index, lay.tile, lay.intervals, split.strides[k], split.extents[k]) for k in split.sinks
    )
    return needs(split, dict(zip(split.sinks, writes, strict=True))), writes
