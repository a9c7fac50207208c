"""The step geometry of every node on a block of diagonal rows at once, from the block's arrays.

``steps.geometries`` says what a node's step depends on along each dimension: the lengths of its
box and its inputs' boxes, whether its window reaches out of the image, whether it reads a sub-box
of its stored input, a transposed convolution's input length. The grid's class keys
(``grid._key``) ask it for every node of every row they visit, one ``Box`` at a time; here it is
computed for a ``tiles.Block`` of rows with numpy (``BlockGeometry``), the same values exactly
(tests/test_batch_geometry.py). A row with an empty box (which changes which inputs a node reads)
is computed the scalar way (``row_geometries``).
"""

from __future__ import annotations

import numpy as np

from bigpicture.engine import intervals
from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose, Pad
from bigpicture.engine.rules.window import MaxPool, NativePadding
from bigpicture.engine.split import Split
from bigpicture.engine.tiles import Block
from bigpicture.perf.steps import _NORM, _facts, _stored, geometries, spatial_inputs


def supported(split: Split) -> bool:
    """Whether ``BlockGeometry`` knows every op's padded box and native padding: those of the rules
    here (a rule registered elsewhere may change them; its split is computed row by row)."""
    for op in split.ops.values():
        kind = type(op)
        if isinstance(op, (Window, Pad)) and kind.padded_box not in (Window.padded_box, Pad.padded_box):
            return False
        if isinstance(op, NativePadding) and (
            kind.crops is not NativePadding.crops or kind.native_pads is not NativePadding.native_pads
        ):
            return False
    return True


def row_geometries(split: Split, need: dict, copy: bool, other: dict | None = None) -> dict:
    """Every computed node's ``steps.geometries`` on one tile (``need``), the input copied or not;
    ``other``: the same with ``copy`` the other way, whose values hold for nodes not reading the image."""
    return {
        node: geometries(split, node, need, _stored(split, inputs, need, copy))
        if other is None or not inputs or inputs[0] is split.input
        else other[node]
        for node, box in need.items()
        if node in split.ops and not box.empty
        for inputs in (spatial_inputs(split, node, need),)
    }


class BlockGeometry:
    """The geometry of every node on the rows of one block, as arrays of shape (nodes, dimensions,
    rows): for the nodes in ``ops``, ``outside``, ``extra`` and, per input copied or not, ``differ``
    (``steps.geometries``' fields; the lengths are the block's).
    Each field is computed for every node of a kind at once (windows, normalisations), with the
    ops' parameters gathered into arrays: a block costs a few dozen numpy calls, not a few per node."""

    def __init__(self, split: Split, block: Block) -> None:
        self.split, self.block = split, block
        self.where = block.place
        static = _static(split, block)
        self.ops, self.at, self.inputs = static.ops, static.at, static.inputs
        shape = (len(self.ops), split.nd, block.lo.shape[2])
        self.outside = np.zeros(shape, dtype=bool)
        self.extra = np.zeros(shape if static.transposed else (1, 1, 1), dtype=np.int64)
        if not static.transposed:  # no memory for zeros
            self.extra = np.broadcast_to(self.extra, shape)
        self.differ = {True: np.zeros(shape, dtype=bool), False: np.zeros(shape, dtype=bool)}
        for i, node in static.transposed:
            (elo, ehi), = intervals.op_needs(split.ops[node], *self.box(node), None)
            self.extra[i] = np.maximum(ehi - elo, 0)
        self._canon: dict = {}
        if static.windows:
            self._windows(static)
        if static.norms:
            self._norms(static)

    def box(self, node) -> tuple[np.ndarray, np.ndarray]:
        w = self.where[node]
        return self.block.lo[w], self.block.hi[w]

    def _windows(self, static: _Static) -> None:
        """``outside`` of windows and paddings, and ``differ`` of windows: the padded box against
        the box of the value the first input is stored as (``steps._stored``)."""
        index, params = static.windows, static.window_params
        plo, phi = _padded(params, *self._gather(static.window_boxes))
        self.outside[index] = (plo < 0) | (phi > params[:, _EXTENT])
        slo, shi = self._gather(static.window_firsts)
        window = static.window_mask
        self.differ[True][index] = ((plo != slo) | (phi != shi)) & window
        image = static.window_image  # stored whole: [0, extent)
        slo, shi = np.where(image, 0, slo), np.where(image, static.extent, shi)
        self.differ[False][index] = ((plo != slo) | (phi != shi)) & window

    def _norms(self, static: _Static) -> None:
        """``differ`` of normalisations (``steps._strided_input``): a sub-box of the first input, or
        the result of a natively padded window that dropped outputs (``_crops``)."""
        lo, hi = self._gather(static.norm_boxes)
        flo, fhi = self._gather(static.norm_firsts)
        sub = (lo != flo) | (hi != fhi)
        cropping = static.cropping
        if cropping:
            sub[cropping] |= _crops(static.crop_ops, flo[cropping], fhi[cropping], static.crop_params)
        sub &= ~(fhi <= flo).any(axis=1, keepdims=True)  # an empty input box: no strided read
        self.differ[True][static.norms] = self.differ[False][static.norms] = sub

    def _gather(self, boxes: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return self.block.lo[boxes], self.block.hi[boxes]

    def row(self, r: int, copy: bool) -> dict:
        """``row_geometries`` of row r (which has no empty box but maybe the unread input's)."""
        nd = self.split.nd
        lengths = np.maximum(self.block.hi[:, :, r] - self.block.lo[:, :, r], 0).T.tolist()
        arrays = (self.outside, self.differ[copy], self.extra)
        fields = [[a[:, d, r].tolist() for d in range(nd)] for a in arrays]
        out, canon = {}, self._canon  # equal tuples made once: a deep network repeats a few geometries
        for i, node in enumerate(self.ops):
            boxes = (self.where[node], *self.inputs[node])
            dims = []
            for d in range(nd):
                g = (tuple([lengths[d][w] for w in boxes]), fields[0][d][i], fields[1][d][i], fields[2][d][i])
                dims.append(canon.setdefault(g, g))
            g = tuple(dims)
            out[node] = canon.setdefault(g, g)
        return out

    def node(self, r: int, copy: bool, node) -> tuple:
        """``row(r, copy)[node]``, for one node: the arrays of the other nodes not read."""
        i, boxes = self.at[node], (self.where[node], *self.inputs[node])
        lo, hi = self.block.lo[list(boxes), :, r].astype(np.int64), self.block.hi[list(boxes), :, r]
        lengths = np.maximum(hi - lo, 0).T.tolist()
        fields = [a[i, :, r].tolist() for a in (self.outside, self.differ[copy], self.extra)]
        return tuple((tuple(lengths[d]), *(f[d] for f in fields)) for d in range(self.split.nd))

    def key(self, r: int, d: int) -> bytes:
        """A key equal for two rows of the block exactly when ``grid._row_key`` is, along dimension
        d: every box's length, and every node's (outside, differ, extra) with the input copied and
        not (the nodes are the same in every row: none has an empty box)."""
        lengths = np.maximum(self.block.hi[:, d, r] - self.block.lo[:, d, r], 0)
        fields = (self.outside, self.differ[True], self.differ[False], self.extra)
        return np.concatenate([lengths, *(a[:, d, r] for a in fields)]).tobytes()


class _Static:
    """What ``BlockGeometry`` reads of the split and of a block's node order alone (which nodes are
    windows, normalisations, transposed convolutions; their parameters; which boxes they compare),
    made once for the blocks of one walk (``tiles.Diagonal`` walks a diagonal's two border blocks
    together: they share their ``place``)."""

    def __init__(self, split: Split, block: Block) -> None:
        s, where = split, block.place
        self.ops = [n for n in block.nodes if n in s.ops]
        self.at = {n: i for i, n in enumerate(self.ops)}  # node -> its index in the arrays
        self.inputs = {n: [where[i] for i in s.ops[n].inputs if i in where] for n in self.ops}
        self.windows, self.norms, self.transposed = [], [], []
        for i, node in enumerate(self.ops):
            op = s.ops[node]
            if isinstance(op, (Window, Pad)):
                self.windows.append(i)
            elif _facts(s, node)[0] in _NORM and op.inputs and op.inputs[0] in where:
                self.norms.append(i)
            if isinstance(op, ConvTranspose):
                self.transposed.append((i, node))
        if self.windows:
            ops = [s.ops[self.ops[i]] for i in self.windows]
            self.window_params = _params(ops)
            self.window_boxes = [where[self.ops[i]] for i in self.windows]
            firsts = []
            for i in self.windows:
                inputs = [j for j in s.ops[self.ops[i]].inputs if j is s.input or j in where]
                firsts.append(inputs[0] if inputs else s.input)
            self.window_firsts = [where[f] for f in firsts]
            self.window_mask = np.array([isinstance(op, Window) for op in ops])[:, None, None]
            self.window_image = np.array([f is s.input for f in firsts])[:, None, None]
            self.extent = np.asarray(s.extents[s.input])[:, None]
        if self.norms:
            firsts = [s.ops[self.ops[i]].inputs[0] for i in self.norms]
            self.norm_boxes = [where[self.ops[i]] for i in self.norms]
            self.norm_firsts = [where[f] for f in firsts]
            # as on a CPU, the only device whose rates tell a strided input apart (``NativePadding.crops``)
            natively = [isinstance(s.ops.get(f), Window) and s.ops[f].pads_natively(True) for f in firsts]
            self.cropping = [k for k, n in enumerate(natively) if n]
            self.crop_ops = [s.ops[firsts[k]] for k in self.cropping]
            self.crop_params = _params(self.crop_ops) if self.crop_ops else None


def _static(split: Split, block: Block) -> _Static:
    """The block's ``_Static``, cached by its ``place`` (kept, so its id is not reused while cached)
    and split."""
    found = _STATICS.get(id(block.place))
    if found is None or found[0] is not block.place or found[1] is not split:
        if len(_STATICS) >= 64:
            _STATICS.pop(next(iter(_STATICS)))
        found = _STATICS[id(block.place)] = (block.place, split, _Static(split, block))
    return found[2]


_STATICS: dict = {}


_STEP, _PAD, _REACH, _EXTENT, _KERNEL, _DILATION = range(6)  # the fields of ``_params``


def _params(ops: list) -> np.ndarray:
    """Per op its parameters (step, pad_lo, reach d (k - 1), input extent, kernel, dilation; a
    padding's: a window of one pixel, stride 1), as an array of shape (ops, fields, dimensions, 1)."""
    return np.array([_record(op) for op in ops], dtype=np.int64)[..., None]


def _record(op) -> tuple:
    """``_params``' row of one op, cached by op: the passes of a network share their ops, and each
    pass's blocks ask for the same ones (the op is kept, so its id is not reused while cached)."""
    found = _RECORDS.get(id(op))
    if found is None or found[0] is not op:
        nd = len(op.pad_lo)
        if isinstance(op, Window):
            kernel, dilation = tuple(map(int, op.kernel)), tuple(map(int, op.dilation))
            reach = tuple(d * (k - 1) for d, k in zip(dilation, kernel, strict=True))
            step = tuple(map(int, op.step))
        else:
            kernel = dilation = step = (1,) * nd
            reach = (0,) * nd
        row = (step, tuple(map(int, op.pad_lo)), reach, tuple(map(int, op.in_extents[0])), kernel, dilation)
        if len(_RECORDS) >= 8192:
            _RECORDS.pop(next(iter(_RECORDS)))
        found = _RECORDS[id(op)] = (op, row)
    return found[1]


_RECORDS: dict = {}


def _padded(params: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``op.padded_box`` of each op's box at once (``params``: the ops' ``_params``)."""
    step, pad = params[:, _STEP], params[:, _PAD]
    return lo * step - pad, (hi - 1) * step - pad + params[:, _REACH] + 1


def _crops(ops: list, lo: np.ndarray, hi: np.ndarray, params: np.ndarray | None = None) -> np.ndarray:
    """``NativePadding.crops`` of each op's output box at once (arrays of shape (ops, dimensions, rows));
    ``params``: the ops' ``_params``, if made already."""
    params = _params(ops) if params is None else params
    plo, phi = _padded(params, lo, hi)
    extent, step = params[:, _EXTENT], params[:, _STEP]
    ilo, ihi = intervals.clip(plo, phi, extent)
    below, above = ilo - plo, phi - ihi
    pad = below + -(-np.maximum(above - below, 0) // step) * step
    kernel, dilation = params[:, _KERNEL], params[:, _DILATION]
    native = np.empty((len(ops), 1, lo.shape[2]), dtype=bool)
    for k, op in enumerate(ops):
        kind = type(op)
        if kind.native_padding is NativePadding.native_padding:
            native[k] = True
        elif kind.native_padding is MaxPool.native_padding:
            native[k] = (2 * pad[k] <= kernel[k]).all(axis=0)
        else:
            native[k] = [op.native_padding(tuple(p)) for p in pad[k].T.tolist()]
    made = (np.maximum(ihi - ilo, 0) + 2 * pad - dilation * (kernel - 1) - 1) // step + 1
    inside = ~(ihi <= ilo).any(axis=1, keepdims=True)
    return (made != np.maximum(hi - lo, 0)) & native & inside
