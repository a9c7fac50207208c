"""``conv_rates.py``'s ``conv_rates`` and ``backends_of`` as they were before torch's kernel family was
asked per class of boxes (``conv_rates._classes``) rather than per box (the reference of
``test_backends_fast.py``): the same functions, line for line, with a store of their own."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from bigpicture.perf.rates import Rates

MAX_BACKENDS = 1 << 17  # boxes kept over all signatures (~150 bytes each); past that, all are dropped
_known: dict = {}  # signature -> box -> kernel family (None: torch cannot say)
_count = [0]


def conv_rates(
    op, lengths: np.ndarray, positions: np.ndarray, n: int, cin: int, cout: int, transposed: bool, nd: int,
    fan_in: int, stride: int, case: tuple, rates: Rates,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(forward, backward) flops/s of each row of a convolution's steps: ``lengths`` (rows, nd) its
    input box (the padded box, a transposed convolution's input), ``positions`` its work's positions
    (``Rates.convs``' argument; 0: no work, rate 1). ``case``: (transposed, input channels per group,
    kernel volume)."""
    fwd, bwd = np.ones(len(positions)), np.ones(len(positions))
    live = positions != 0
    if not live.any():
        return fwd, bwd
    if rates.gpu or not rates.measured:  # no kernel family: a formula or one rate, memoised per positions
        at = positions[live].tolist()
        fwd[live] = rates.convs(nd, fan_in, cout, at, stride, False, *case, [None] * len(at))
        bwd[live] = rates.convs(nd, fan_in, cout, at, stride, True, *case, [None] * len(at))
        return fwd, bwd
    distinct, inverse = _distinct(np.column_stack([lengths[live], positions[live]]))
    # the distinct rows are sorted: a box's rows are consecutive, its kernel family asked once
    box = np.ones(len(distinct), dtype=bool)
    box[1:] = (distinct[1:, :nd] != distinct[:-1, :nd]).any(axis=1)
    families = backends_of(op, distinct[:, :nd][box].tolist(), n, cin, cout, transposed, rates)
    which = np.cumsum(box) - 1
    found = rates.conv_rows(nd, fan_in, cout, stride, *case, distinct[:, nd], families, which)
    if found is None:  # positions too many for ``conv_rows``' keys: as lists
        at, backends = distinct[:, nd].tolist(), [families[i] for i in which.tolist()]
        found = [np.array(rates.convs(nd, fan_in, cout, at, stride, backward, *case, backends))
                 for backward in (False, True)]  # fmt: skip
    fwd[live], bwd[live] = found[0][inverse], found[1][inverse]
    return fwd, bwd


def _distinct(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(rows, axis=0, return_inverse=True)`` (the inverse flat), the same arrays: where the
    rows' entries (non-negative) fit one int64 in mixed radix (each column's maximum + 1), which
    orders them as the rows sort, numpy sorts those keys instead of the rows as bytes."""
    top = rows.max(axis=0).tolist() if len(rows) else []
    if not len(rows) or rows.min() < 0 or math.prod(t + 1 for t in top) >= 1 << 63:
        distinct, inverse = np.unique(rows, axis=0, return_inverse=True)
        return distinct, inverse.reshape(-1)
    key = rows[:, 0].copy()
    for column, t in zip(rows.T[1:], top[1:], strict=True):
        key *= t + 1
        key += column
    order = key.argsort()
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[order[1:]] != key[order[:-1]]
    inverse = np.empty(len(key), dtype=np.intp)
    inverse[order] = np.cumsum(first) - 1
    return rows[order[first]], inverse


def backends_of(op, boxes: list, n: int, cin: int, cout: int, transposed: bool, rates: Rates) -> list:
    """The kernel family torch runs one convolution with on the CPU (``rates.conv_backend``) for each
    input box (a list of lengths: the padded box a convolution reads, a transposed convolution's
    input), each box asked of torch once per signature; None on a GPU or an uncalibrated CPU."""
    if rates.gpu or not rates.measured:
        return [None] * len(boxes)
    weight = (cin, cout // op.groups) if transposed else (cout, cin // op.groups)
    kernel, step, dilation = tuple(op.kernel), tuple(op.step), tuple(op.dilation)
    signature = ((n, cin), weight + kernel, step, dilation, op.groups, transposed, rates.dtype)
    known = _known.get(signature)
    if known is None:
        known = _known[signature] = {}
    boxes = list(map(tuple, boxes))
    new = [b for b in dict.fromkeys(boxes) if b not in known]
    if new:
        if _count[0] + len(new) > MAX_BACKENDS:  # every box of this call asked again, the known too
            _known.clear()
            _count[0] = 0
            known = _known[signature] = {}
            new = list(dict.fromkeys(boxes))
        known.update(zip(new, _select(signature, new), strict=True))
        _count[0] += len(new)
    return list(map(known.__getitem__, boxes))


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
