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
import operator
from dataclasses import dataclass

import numpy as np

from bigpicture.engine.box import Box
from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose, Pad, Resample, Slice
from bigpicture.engine.rules.window import AvgPool, Conv, MaxPool, NativePadding, Pool
from bigpicture.engine.split import Split
from bigpicture.perf.conv_rates import conv_rates
from bigpicture.perf.conv_work import conv_work
from bigpicture.perf.fusion import fuse
from bigpicture.perf.rates import PARALLEL_ELEMENTS, Rates
from bigpicture.perf.row_memo import Rows, step_memo
from bigpicture.perf.step_rates import _per_byte, _rates

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
# CPU kernels that split their work over every thread whatever its size (oneDNN and BLAS
# convolutions, ATen's pooling loops over channels); elementwise ops only over PARALLEL_ELEMENTS
ALWAYS_PARALLEL = ("conv", "pool")
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
    op = split.ops[node]
    padded = op.padded_box(box).shape if isinstance(op, Window) else (1,) * split.nd
    extra = op.needs(box)[0].shape if isinstance(op, ConvTranspose) else (1,) * split.nd
    rows = Rows(
        np.array([box.numel], dtype=np.int64),
        tuple((i, np.array([need[i].numel], dtype=np.int64)) for i in op.inputs if i in need),
        np.array([padded], dtype=np.int64),
        np.array([extra], dtype=np.int64),
        np.array([copied and isinstance(op, (Window, Pad)) and _outside(op, box)]),
        np.array([copied]),
    )
    return row(steps_of(split, node, rows, item, rates, grad_in), 0)


_FLAGS = ("saves_inputs", "saves_output", "aliases", "keeps_padded")


def row(st: Step, i: int) -> Step:
    """Row i of a step on arrays (``steps_of``), on Python numbers."""
    values = {
        f: getattr(st, f)[i] for f in ("out", "temp", "padded", "saved_extra", "flops", "bytes", "flops_bwd")
    }
    values = {f: int(v) for f, v in values.items()}
    values.update({f: bool(getattr(st, f)[i]) for f in _FLAGS})
    values.update(fwd_s=float(st.fwd_s[i]), bwd_s=float(st.bwd_s[i]), kind=str(st.kind[i]))
    return Step(st.node, st.inputs, **values)


MEMO = True  # rows of steps kept per node (``row_memo``); False: every row built again (tests compare)
_FIELDS = ("out", "temp", "padded", "saved_extra", "flops", "bytes", "flops_bwd", "fwd_s", "bwd_s", "kind",
           *_FLAGS)  # fmt: skip


def steps_of(
    split: Split, node, rows: Rows, item: int, rates: Rates, grad_in: bool, least: bool = False
) -> Step:
    """The steps of ``node`` on every row of ``rows`` at once: a ``Step`` whose numbers, flags and
    kind are arrays with one entry per row (``row`` takes one out). ``least``: a normalisation's rows
    at the faster of its plain and strided rates (the time bound's, with nothing copied).

    Steps built before on the same rows for this node (another pass, candidate tile or bound) are
    read back from a memo on ``rates`` (``row_memo.StepMemo``)."""
    if not MEMO:
        return _steps_of(split, node, rows, item, rates, grad_in, least)
    key = (memo_context(split, node, rows, item, rates, grad_in, least), rows.key())

    def compute() -> dict:
        st = _steps_of(split, node, rows, item, rates, grad_in, least)
        return {f: getattr(st, f) for f in _FIELDS}

    return Step(node, tuple(split.ops[node].inputs), **step_memo(rates).get(key, compute))


def memo_context(split: Split, node, rows: Rows, item: int, rates: Rates, grad_in: bool, least: bool):
    """``steps_of``'s memo key without the rows' numbers (grad_in: a convolution's; least: a norm's)."""
    op, fused = split.ops[node], getattr(rates, "fused", False)
    conv, norm = isinstance(op, (Conv, ConvTranspose)), _facts(split, node)[0] in _NORM
    return (node, op, split.shapes[node], tuple([i for i, _ in rows.inputs]), item, conv and grad_in,
            norm and least, rates.wake_s, fused, split.sinks if fused else None)  # fmt: skip


def _steps_of(
    split: Split, node, rows: Rows, item: int, rates: Rates, grad_in: bool, least: bool = False
) -> Step:
    """``steps_of`` without the memo: every row built."""
    op, shape = split.ops[node], split.shapes[node]
    n, c, r = shape[0], shape[1], len(rows.numel)
    ins = tuple(op.inputs)
    elems = n * c * rows.numel
    in_bytes = sum(
        (math.prod(split.shapes[i][:2]) * numel * item for i, numel in rows.inputs), np.zeros(r, np.int64)
    )
    name, inplace, _ = _facts(split, node)
    outside = rows.outside & rows.copied
    view = np.full(r, name in _VIEWS or isinstance(op, Slice)) | (isinstance(op, Pad) & ~outside)
    zero, no = np.zeros(r, dtype=np.int64), np.zeros(r, dtype=bool)
    st = Step(node, ins, np.where(view | inplace, 0, elems * item), aliases=view | inplace, temp=zero,
              padded=zero, saves_inputs=no, saves_output=no, saved_extra=zero, keeps_padded=no,
              kind=np.empty(r, dtype=object), flops=zero, bytes=in_bytes + elems * item,
              fwd_s=np.zeros(r), bwd_s=np.zeros(r), flops_bwd=zero)  # fmt: skip
    st.kind.fill("unary")  # one str for every row (``np.full`` converts it row by row: 15x slower)
    pad_copy = zero
    padded_numel = rows.padded.prod(axis=1)
    if isinstance(op, Window):  # a Pad op's padded copy is its own output
        # An op that pads natively (engine/rules/window.py) reads a view of its input at the image
        # border, padded by the kernel itself: no padded copy, and autograd keeps the input. Its
        # sub-box reads inside the image are still charged a contiguous copy.
        native = op.pads_natively(not rates.gpu)
        copied = rows.copied & ~rows.outside if native else rows.copied
        pad_copy = np.where(copied, math.prod(split.shapes[ins[0]][:2]) * padded_numel * item, 0)
        st.temp = pad_copy
        st.padded = np.where(outside, pad_copy, 0)  # autograd saves the padded copy, not a contiguous one
        st.keeps_padded = st.padded > 0
    kind, views = ("conv" if isinstance(op, (Conv, ConvTranspose)) else "pool"), no  # no row a view
    if isinstance(op, (Conv, ConvTranspose)):
        _conv_steps(split, op, st, rows, n, c, item, rates, grad_in)
    elif isinstance(op, Pool):
        window = elems * math.prod(op.kernel)
        st.kind[:], st.saves_inputs = "pool", ~no
        st.saved_extra = elems * 8 if isinstance(op, MaxPool) else zero
        if isinstance(op, AvgPool):
            st.temp = st.temp + elems * item  # window sums, then divided
        st.fwd_s = np.array([max(w / rates.pool(w), b / rates.stream("unary", b))
                             for w, b in zip(window.tolist(), st.bytes.tolist(), strict=True)])  # fmt: skip
        st.bwd_s = np.array([max(w / rates.pool(w, True), 2 * b / rates.stream("unary", 2 * b))
                             for w, b in zip(window.tolist(), st.bytes.tolist(), strict=True)])  # fmt: skip
    else:
        strided, views = None if least else rows.copied, view & ~np.bool_(inplace)
        kind = _stream_steps(op, name, st, views, elems, item, rates, strided)
    if isinstance(op, Window):
        st.fwd_s = st.fwd_s + _per_byte(2 * pad_copy, rates.streams("copy", 2 * pad_copy))
    # it runs on every thread, waking them first: convolutions (oneDNN, BLAS) and pooling at any size
    # (kind ALWAYS_PARALLEL: every row but a view), the others past PARALLEL_ELEMENTS
    woken = ~views & ((kind in ALWAYS_PARALLEL) | (elems >= PARALLEL_ELEMENTS))
    st.fwd_s = np.where(woken, st.fwd_s + rates.wake_s, st.fwd_s)
    st.bwd_s = np.where(woken & (st.bwd_s != 0), st.bwd_s + rates.wake_s, st.bwd_s)
    if getattr(rates, "fused", False):  # compiled tiles: memory-bound chains fused (perf/fusion.py)
        fuse(split, node, st)
    st.bwd_s = st.bwd_s + _gradient_sum_s(split, node, rates)
    return st


def _gradient_sum_s(split: Split, node, rates: Rates) -> float:
    """Seconds a tile's backward spends adding its parameter gradients into the run's sums, which the
    engine keeps in float64 (``execute``: ``gr.to(float64)``, then ``totals + gr``): a float32 read
    and a float64 write, then two float64 reads and a write, per element of each parameter (the first
    tile's sum is its copy: one add per parameter per step over-counted)."""
    memo = rates.__dict__.setdefault("_gradient_sums", {})  # per rates: asked per pass and tile
    if node not in memo:
        module = _module(split, node)
        params = module.parameters() if module is not None else ()
        elements = sum(p.numel() for p in params if p.requires_grad)
        copy, add = elements * 12, elements * 24
        memo[node] = 0.0
        if elements:
            memo[node] = copy / rates.stream("copy", copy) + add / rates.stream("binary", add)
    return memo[node]


def _conv_steps(split: Split, op, st: Step, rows: Rows, n: int, c: int, item: int, rates: Rates, grad_in):
    """``steps_of`` for a convolution: its work, workspace and seconds (from ``rates.conv``)."""
    ins, nd = tuple(op.inputs), split.nd
    transposed = isinstance(op, ConvTranspose)
    st.kind[:], st.saves_inputs, stride = "conv", np.ones(len(rows.numel), dtype=bool), max(op.step)
    cin = split.shapes[ins[0]][1]
    fan_in, positions, st.flops = conv_work(op, transposed, n, cin, c, rows.numel, rows.extra)
    read = n * cin * (rows.padded if not transposed else rows.extra).prod(axis=1) * item
    # the column matrix: input channels x kernel per output position (a transposed convolution
    # scatters output channels x kernel per input position)
    im2col = n * (c * positions // n if transposed else cin * rows.numel) * math.prod(op.kernel) * item
    st.temp = st.temp + rates.workspaces(nd, np.maximum(read, st.out), im2col, transposed)
    st.flops_bwd = st.flops * (2 if grad_in else 1)
    case = (transposed, cin // (1 if transposed else op.groups), math.prod(op.kernel))
    lengths = rows.extra if transposed else rows.padded
    # a transposed convolution of an empty input box (a tile reading padding only): no work, no seconds
    fwd, bwd = conv_rates(
        op, lengths, positions, n, cin, c, transposed, nd, fan_in, stride, case, rates, grad_in
    )
    st.fwd_s, st.bwd_s = st.flops / fwd, st.flops_bwd / bwd


def _stream_steps(
    op, name: str, st: Step, view: np.ndarray, elems, item: int, rates: Rates, strided: np.ndarray | None
) -> str:
    """``steps_of`` for a memory-bound op (rows where it is a view of its input move nothing; a
    normalisation's ``strided`` rows read a strided view, at the rate calibrated for that): its kind."""
    kind = _stream_kind(op, name)
    st.kind = np.array([kind, "view"], dtype=object).take(view.astype(np.intp))
    st.saves_output = ~view & (name in _SAVE_OUTPUT)
    st.saves_inputs = ~view & (
        name not in _SAVE_OUTPUT and name not in _SAVE_NOTHING and not isinstance(op, (Pad, Resample))
    )
    moved = np.where(st.saves_inputs | st.saves_output, 3 * elems * item, 0)
    st.fwd_s = np.where(view, 0.0, _per_byte(st.bytes, _rates(rates, kind, st.bytes, strided)))
    st.bwd_s = _per_byte(moved, _rates(rates, kind, moved, strided, backward=True))
    return kind


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
    key = step_key(node, geometries(split, node, need, stored), grad_in)
    if key not in memo:
        copied = key[1] or key[2]
        memo[key] = _step(split, node, need[node], copied, need, item, rates, grad_in)
    return memo[key]


def spatial_inputs(split: Split, node, need: dict) -> list:
    """The inputs of ``node`` that the tile computes (or the image): the first is what it reads."""
    out, x = [], split.input
    for i in split.ops[node].inputs:  # ``not need[i].empty`` inline: the planner asks per node and row
        box = need.get(i) if i is not x else None
        if i is x or (box is not None and all(map(operator.lt, box.lo, box.hi))):
            out.append(i)
    return out


def dim_geometry(split: Split, node, need: dict, stored: Box, d: int) -> tuple:
    """What the step of ``node`` depends on along dimension d (``geometries``)."""
    return geometries(split, node, need, stored)[d]


def geometries(split: Split, node, need: dict, stored: Box) -> tuple[tuple, ...]:
    """What the step of ``node`` depends on along each dimension: the lengths of its box and of its
    inputs' boxes, whether its window reaches out of the image (padded there), whether it reads a
    sub-box of its stored input (convolution and pooling kernels copy a strided input first), and
    a transposed convolution's input length. A tile's step is a function of these, per dimension."""
    op, box = split.ops[node], need[node]
    boxes = [box] + [need[i] for i in op.inputs if i in need]
    # the boxes' lengths per dimension (``Box.shape``, transposed), without building each shape
    lengths = [tuple([h - a if h > a else 0 for a, h in zip(b.lo, b.hi)]) for b in boxes]
    lengths = list(zip(*lengths, strict=True))
    nd = split.nd
    outside = differ = (False,) * nd
    if isinstance(op, (Window, Pad)):
        lo, hi = padded_bounds(op, box)
        extent = op.in_extents[0]
        outside = tuple([a < 0 or b > n for a, b, n in zip(lo, hi, extent, strict=True)])
        if isinstance(op, Window):
            bounds = zip(lo, hi, stored.lo, stored.hi, strict=True)
            differ = tuple([a != c or b != e for a, b, c, e in bounds])
    elif _facts(split, node)[0] in _NORM:
        differ = _strided_input(split, op, box, need)
    extra = op.needs(box)[0].shape if isinstance(op, ConvTranspose) else (0,) * nd
    return tuple(zip(lengths, outside, differ, extra, strict=True))


def padded_bounds(op, box: Box) -> tuple[tuple, tuple]:
    """(lo, hi) of ``op.padded_box(box)``: a plain window's arithmetic inline (``Window.padded_box``,
    without a ``Box``: ``geometries`` asks per node and diagonal row, a few hundred thousand times)."""
    if type(op).padded_box is not Window.padded_box:
        padded = op.padded_box(box)
        return padded.lo, padded.hi
    lo, hi = [], []
    for a, b, s, p, d, k in zip(box.lo, box.hi, op.step, op.pad_lo, op.dilation, op.kernel):
        lo.append(int(a * s - p))
        hi.append(int((b - 1) * s - p + d * (k - 1) + 1))
    return tuple(lo), tuple(hi)


def _strided_input(split: Split, op, box: Box, need: dict) -> tuple[bool, ...]:
    """Per dimension, whether a normalisation reads a strided view there: the result of a natively
    padded op that dropped outputs (``NativePadding.crops``), or a sub-box of its input. PyTorch's
    CPU BatchNorm then takes its generic path, about twice as slow (``steps_of``: "norm_strided")."""
    first = op.inputs[0] if op.inputs else None
    if first is None or first not in need or need[first].empty:
        return (False,) * split.nd
    sub = tuple(box.dim(d) != need[first].dim(d) for d in range(split.nd))
    producer = split.ops.get(first)
    if isinstance(producer, Window) and producer.pads_natively(True):  # as on a CPU (``NativePadding.crops``)
        return tuple(a or b for a, b in zip(sub, _crops(producer, need[first]), strict=True))
    return sub


def _crops(op, out: Box) -> tuple[bool, ...]:
    """``op.crops(out)``, none where ``out``'s padded box lies inside the image (no padding: the op
    makes exactly ``out``, (n - d (k - 1) - 1) // s + 1 = b - a of a padded length n = (b - 1 - a) s +
    d (k - 1) + 1), without ``NativePadding.native_pads``'s boxes: most tiles are interior ones."""
    cls = type(op)
    if cls.crops is NativePadding.crops and cls.native_pads is NativePadding.native_pads and not out.empty:
        lo, hi = padded_bounds(op, out)
        if all(a >= 0 for a in lo) and all(b <= n for b, n in zip(hi, op.in_extents[0], strict=True)):
            return (False,) * len(lo)
    return op.crops(out)


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
