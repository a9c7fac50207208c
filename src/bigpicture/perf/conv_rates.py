"""A convolution node's rates on its rows: each distinct (kernel family, output positions) rated once.

``steps._conv_steps`` charges every row of a node's steps the flops/s of its shape: torch's CPU
kernel family for the row's padded input box (``rates.conv_backend``) and the calibrated rate of
that family at the row's output positions (``Rates.convs``). A node's rows repeat a few shapes
(SENet154 at 16,384^2 on the CPU: 295,000 rows, 195,000 distinct per node, 74,000 input boxes in
all), so the rows are deduplicated first and each distinct one asked once, then spread back:

    rows (box, positions) --_classes--> class of each box --backends_of--> kernel family per class
                          --unique_rows--> distinct (class, positions) --Rates.conv_rows--> flops/s
                          <--inverse-- the same floats per row

Torch's choice (``_select_conv_backend``, aten/src/ATen/native/Convolution.cpp, torch 2.3 to 2.x) reads
the input's spatial lengths in these places only, for a fixed convolution (batch, channels, weight,
stride, dilation, groups, dtype) and process state (threads, oneDNN enabled): ``check_shape_forward``
(not transposed: every length at least the dilated kernel's, padding 0 here, else an error);
``numel == 0`` (an error: batch and channels are fixed); ``use_mkldnn``'s ``N*C*H*W > 20480`` (the
4-d view's H*W: a 1-d input is viewed as (N, C, 1, L), a 3-d one's H*W are its first two lengths);
and the input's contiguity (``use_cpu_depthwise3x3_winograd``, ARM only: an expanded tensor is
contiguous iff every length is 1). ``_classes`` keys a box by those (and by whether it has 2**31
elements or more, a bound torch's GPU paths read): boxes of one key get one answer, so torch is
asked once per key and convolution (``tests/test_backends_fast.py`` checks it against torch box by
box). Boxes whose key could overflow int64, or with negative lengths, are each a class of their own.

``unique_rows`` is ``np.unique(axis=0)`` on packed int64 keys; ``Rates.conv_rows`` keeps a convolution's
rates in sorted arrays, so rows already rated are looked up by numpy, not one at a time.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from bigpicture.perf.rates import Rates
from bigpicture.perf.unique_rows import unique_rows

_known: dict = {}  # signature -> class key -> kernel family (None: torch cannot say); a few keys each
MKLDNN_NUMEL = 20480  # use_mkldnn: "N*C*H*W > 20480" (native is faster below, for a batch of 1)


def conv_rates(
    op, lengths: np.ndarray, positions: np.ndarray, n: int, cin: int, cout: int, transposed: bool, nd: int,
    fan_in: int, stride: int, case: tuple, rates: Rates, grad_in: bool = True,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(forward, backward) flops/s of each row of a convolution's steps: ``lengths`` (rows, nd) its
    input box (the padded box, a transposed convolution's input), ``positions`` its work's positions
    (``Rates.convs``' argument; 0: no work, rate 1). ``case``: (transposed, input channels per group,
    kernel volume). Without ``grad_in`` (its input needs no gradient) the backward's rate is that of
    the weights' gradient alone (``Rates.conv``'s "weight")."""
    back = True if grad_in else "weight"
    fwd, bwd = np.ones(len(positions)), np.ones(len(positions))
    live = positions != 0
    if not live.any():
        return fwd, bwd
    if rates.gpu or not rates.measured:  # no kernel family: a formula or one rate, memoised per positions
        at = positions[live].tolist()
        fwd[live] = rates.convs(nd, fan_in, cout, at, stride, False, *case, [None] * len(at))
        bwd[live] = rates.convs(nd, fan_in, cout, at, stride, back, *case, [None] * len(at))
        return fwd, bwd
    kinds, families = _kinds(op, lengths[live], n, cin, cout, transposed, rates)
    table = np.column_stack([kinds, positions[live]])
    first, inverse = unique_rows(table)
    distinct = table[first]
    which = distinct[:, 0]
    found = rates.conv_rows(nd, fan_in, cout, stride, *case, distinct[:, 1], families, which, back)
    if found is None:  # positions too many for ``conv_rows``' keys: as lists
        at, backends = distinct[:, 1].tolist(), [families[i] for i in which.tolist()]
        found = [np.array(rates.convs(nd, fan_in, cout, at, stride, backward, *case, backends))
                 for backward in (False, back)]  # fmt: skip
    fwd[live], bwd[live] = found[0][inverse], found[1][inverse]
    return fwd, bwd


def backends_of(op, boxes: list, n: int, cin: int, cout: int, transposed: bool, rates: Rates) -> list:
    """The kernel family torch runs one convolution with on the CPU (``rates.conv_backend``) for each
    input box (a list of lengths: the padded box a convolution reads, a transposed convolution's
    input); None on a GPU or an uncalibrated CPU."""
    if rates.gpu or not rates.measured or not len(boxes):
        return [None] * len(boxes)
    boxes = np.array(boxes, dtype=np.int64).reshape(len(boxes), -1)
    kinds, families = _kinds(op, boxes, n, cin, cout, transposed, rates)
    return [families[k] for k in kinds.tolist()]


def _kinds(op, boxes: np.ndarray, n: int, cin: int, cout: int, transposed: bool, rates: Rates) -> tuple:
    """(kind of each box (rows, nd), the kernel family of each kind): ``backends_of`` by class of boxes
    (``_classes``), torch asked once per class and convolution signature (the class's first box)."""
    if rates.gpu or not rates.measured:
        return np.zeros(len(boxes), dtype=np.int64), [None]
    weight = (cin, cout // op.groups) if transposed else (cout, cin // op.groups)
    kernel, step, dilation = tuple(op.kernel), tuple(op.step), tuple(op.dilation)
    signature = ((n, cin), weight + kernel, step, dilation, op.groups, transposed, rates.dtype)
    keys, kinds = _classes(boxes, n * cin, kernel, dilation, transposed)
    if keys is None:  # each distinct box its own class (``kinds``: the boxes), asked every time
        return kinds[1], _select(signature, [tuple(b) for b in kinds[0].tolist()])
    known = _known.setdefault(signature, {})
    new = [i for i, k in enumerate(keys) if k not in known]
    if new:  # a class's first box
        first = [tuple(boxes[int(np.argmax(kinds == i))].tolist()) for i in new]
        known.update(zip([keys[i] for i in new], _select(signature, first), strict=True))
    return kinds, [known[k] for k in keys]


def _classes(boxes: np.ndarray, channels: int, kernel: tuple, dilation: tuple, transposed: bool) -> tuple:
    """Boxes (rows, nd, int64) in classes torch answers alike (the module's docstring): (each class's
    key, in increasing order, and each box's class); where a box's lengths are negative or the keys'
    products could overflow, None and (the distinct boxes, each box's index among them)."""
    nd = boxes.shape[1]
    top = boxes.max(axis=0).tolist() if len(boxes) else [0] * nd
    if len(boxes) and (boxes.min() < 0 or channels * math.prod(top) >= 1 << 62):
        first, inverse = unique_rows(boxes)
        return None, (boxes[first], inverse)
    code = (boxes == 0).any(axis=1).astype(np.int64)  # numel 0: an error
    if not transposed:  # too small for the dilated kernel: an error
        reach = np.array([d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)], dtype=np.int64)
        code |= (boxes >= reach).all(axis=1) << 1
    plane = boxes[:, 0] * boxes[:, 1] if nd > 1 else boxes[:, 0]  # the 4-d view's H*W
    code |= (channels * plane > MKLDNN_NUMEL).astype(np.int64) << 2
    code |= (boxes == 1).all(axis=1) << 3  # an expanded tensor is contiguous iff every length is 1
    code |= (channels * boxes.prod(axis=1) >= 1 << 31).astype(np.int64) << 4
    present = np.flatnonzero(np.bincount(code, minlength=32))
    lookup = np.zeros(32, dtype=np.int64)
    lookup[present] = np.arange(len(present))
    return present.tolist(), lookup[code]


@functools.lru_cache(maxsize=1 << 16)
def conv_backend(
    input_shape: tuple[int, ...], weight_shape: tuple[int, ...], stride: tuple[int, ...],
    dilation: tuple[int, ...], groups: int, transposed: bool, dtype: torch.dtype = torch.float32,
) -> str | None:  # fmt: skip
    """The kernel family torch's CPU dispatch picks for a convolution of these shapes, as the tile
    interpreter calls it (input padded already, padding 0): "Slow2d"/"Slow3d" (im2col + GEMM),
    "Mkldnn" (oneDNN), ... Asked of torch's own heuristic on tensors expanded from one element, so
    nothing of the shape is allocated; None where this torch cannot say."""
    rest = (tuple(weight_shape), tuple(stride), tuple(dilation), groups, transposed, dtype)
    return _select((tuple(input_shape[:2]), *rest), [tuple(input_shape[2:])])[0]


def _select(signature: tuple, boxes: list[tuple]) -> list:
    """``conv_backend(channels + box, *rest)`` of each box, the weight and lists built once: torch's
    dispatch heuristic on tensors expanded from one element (``_one``)."""
    channels, weight_shape, stride, dilation, groups, transposed, dtype = signature
    nd = len(weight_shape) - 2
    try:
        one = _one(dtype)
        w, select = one.expand(weight_shape), torch._C._select_conv_backend
    except (AttributeError, RuntimeError, TypeError):
        return [None] * len(boxes)
    stride, dilation, zeros = list(stride), list(dilation), [0] * nd
    out = []
    for box in boxes:
        try:
            x = one.expand(channels + box)
            backend = select(x, w, None, stride, zeros, dilation, transposed, zeros, groups, None)
        except (AttributeError, RuntimeError, TypeError):
            out.append(None)
            continue
        # ``str`` of torch's enum is most of a box's time, hashing it much: once per member, by its value
        name = _names.get(backend.value)
        if name is None:
            name = _names[backend.value] = str(backend).rsplit(".", 1)[-1]
        out.append(name)
    return out


_names: dict = {}  # torch's ConvBackend member's value -> its name
_one = functools.cache(lambda dtype: torch.empty(1, dtype=dtype))  # expanded, never written
