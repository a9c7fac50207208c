"""``conv_rates.py`` and ``Rates.convs`` as they were before the rates were read per context, the
rows keyed by one integer and their rates kept in arrays (the reference of
``test_rates_fast.py``): the same functions, line for line; ``OldRates`` is ``Rates`` with the old
``convs``, ``backends_of`` keeps its answers in a store of its own."""

from __future__ import annotations

import functools

import numpy as np
import torch
from _old_rate_tables import _grid_table, _logs, _nearest_many, _table_rates

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
    rows = np.column_stack([lengths[live], positions[live]])
    distinct, inverse = np.unique(rows, axis=0, return_inverse=True)
    at, inverse = distinct[:, nd].tolist(), inverse.reshape(-1)
    backends = backends_of(op, distinct[:, :nd].tolist(), n, cin, cout, transposed, rates)
    fwd[live] = np.array(rates.convs(nd, fan_in, cout, at, stride, False, *case, backends))[inverse]
    bwd[live] = np.array(rates.convs(nd, fan_in, cout, at, stride, True, *case, backends))[inverse]
    return fwd, bwd


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
    boxes = [tuple(b) for b in boxes]
    new = [b for b in dict.fromkeys(boxes) if b not in known]
    if new:
        if _count[0] + len(new) > MAX_BACKENDS:
            _known.clear()
            _count[0] = 0
            known = _known[signature] = {}
        known.update(zip(new, _select(signature, new), strict=True))
        _count[0] += len(new)
    return [known[b] for b in boxes]


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
        name = _names.get(backend)  # ``str`` of torch's enum is most of a box's time: once per member
        if name is None:
            name = _names[backend] = str(backend).rsplit(".", 1)[-1]
        out.append(name)
    return out


_names: dict = {}  # torch's ConvBackend member -> its name
_one = functools.cache(lambda dtype: torch.empty(1, dtype=dtype))  # expanded, never written


class OldRates(Rates):
    """``Rates`` with ``convs`` as it was (its memos are the ``Rates``' own)."""

    def convs(self, nd: int, fan_in: int, cout: int, positions: list[int], stride: int, backward: bool,
              transposed: bool, cin: int | None, kernel: int | None, backends: list) -> list:  # fmt: skip
        """``conv`` at each of ``positions`` with its entry of ``backends``: a node's rows at once, those
        the calibration grid does not cover from their nearest measurements together."""
        if not self.gpu and self.ops is None:  # an uncalibrated CPU: one nominal rate (``conv``'s)
            return [0.5 * self.peak] * len(positions)
        if self.gpu:
            case = {"cin": cin, "kernel": kernel}
            return [self.conv(nd, fan_in, cout, p, stride, backward, transposed, **case, backend=b)
                    for p, b in zip(positions, backends, strict=True)]  # fmt: skip
        value, nearest = "backward" if backward else "forward", {}
        points, gridded = self._points(nd, transposed)
        # memo per context (what a node's rows share), by (positions, backend): no 10-tuple per row
        context = (nd, fan_in, cout, stride, backward, transposed, cin, kernel)
        memo = self._rows.get(context)
        if memo is None:
            memo = self._rows[context] = {}
        asked = list(zip(positions, backends, strict=True))
        new = [q for q in dict.fromkeys(asked) if q not in memo]
        if not points:  # a calibration without convolutions
            memo.update((q, 0.5 * self.peak) for q in new)
        elif cin is not None and kernel is not None and gridded:
            for backend in dict.fromkeys(b for _, b in new):  # many positions of one table at once
                table_key = (nd, transposed, value, stride > 1, backend, kernel)
                if table_key not in self._tables:
                    self._tables[table_key] = _grid_table(points, value, stride, kernel, backend)
                at = [q for q in new if q[1] == backend]
                found = _table_rates(*self._tables[table_key], cin, cout, [p for p, _ in at])
                memo.update((q, r) for q, r in zip(at, found, strict=True) if r is not None)
        for q in new:  # those the grid does not cover: from their nearest measurements, together
            if q not in memo:
                nearest[q] = (fan_in, cout, q[0], 4 ** (min(stride, 2) - 1))
        if nearest:
            if (nd, transposed, value) not in self._tables:  # the points' logs, once
                near = [(p["fan_in"], p["cout"], p["positions"], 4 ** (p["stride"] - 1)) for p in points]
                logs = np.array([_logs(p) for p in near])
                self._tables[nd, transposed, value] = logs, [p[value] for p in points]
            kept = self._tables.setdefault((nd, transposed, "nearest"), {})  # forward and backward alike
            rates = _nearest_many(*self._tables[nd, transposed, value], list(nearest.values()), kept)
            memo.update(zip(nearest, rates, strict=True))
        return [memo[q] for q in asked]
