"""A constant-padded window's or padding's needs over a block (``intervals.op_needs``, from the op's
cached ``_window`` constants) equal what they were (``intervals.source`` of ``intervals.padded``) and
the op's own ``needs`` row by row, on random blocks and windows (kernels, strides, dilations and
paddings; 1D to 3D; boxes inside, across and outside the image, empty ones too).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from test_random_architectures import examples

from bigpicture.engine import intervals
from bigpicture.engine.box import Box
from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import Pad


def _window(nd, kernel, step, dilation, pad, extent, mode) -> Window:
    op = object.__new__(Window)
    op.kernel, op.step, op.dilation, op.pad_lo = kernel[:nd], step[:nd], dilation[:nd], pad[:nd]
    op.in_extents, op.inputs, op.mode, op.nd = [extent[:nd]], ["x"], mode, nd
    return op


def _pad(nd, pad, extent, mode) -> Pad:
    op = object.__new__(Pad)
    op.pad_lo, op.in_extents, op.inputs, op.mode, op.nd = pad[:nd], [extent[:nd]], ["x"], mode, nd
    return op


small = st.lists(st.integers(1, 5), min_size=3, max_size=3)


@st.composite
def cases(draw):
    nd, rows = draw(st.integers(1, 3)), draw(st.integers(1, 7))
    extent = draw(st.lists(st.integers(1, 40), min_size=3, max_size=3))
    pad = draw(st.lists(st.integers(-2, 6), min_size=3, max_size=3))
    if draw(st.booleans()):
        op = _window(nd, draw(small), draw(small), draw(small), pad, extent, "constant")
    else:
        op = _pad(nd, pad, extent, "constant")
    lo = np.array(draw(st.lists(st.integers(-10, 45), min_size=nd * rows, max_size=nd * rows)))
    size = np.array(draw(st.lists(st.integers(-3, 20), min_size=nd * rows, max_size=nd * rows)))
    lo = lo.reshape(nd, rows).astype(np.int64)
    return op, lo, lo + size.reshape(nd, rows)


@examples(300)
@given(cases())
def test_constant_windows_need_what_they_did(case):
    op, lo, hi = case
    inside: dict = {}
    ((got_lo, got_hi),) = intervals.op_needs(op, lo, hi, None, inside)
    want_lo, want_hi = intervals.source(*intervals.padded(op, lo, hi), op.in_extents[0], op.mode)
    assert got_lo.dtype == want_lo.dtype and got_hi.dtype == want_hi.dtype
    assert np.array_equal(got_lo, want_lo) and np.array_equal(got_hi, want_hi)
    for r in range(lo.shape[1]):
        box = op.needs(Box(tuple(lo[:, r].tolist()), tuple(hi[:, r].tolist())))[0]
        assert (tuple(got_lo[:, r].tolist()), tuple(got_hi[:, r].tolist())) == (box.lo, box.hi)
    assert inside[id(got_lo)][1] is got_hi and inside[id(got_lo)][2] == tuple(op.in_extents[0])


def test_cached_constants_follow_the_op():
    """Two ops with the same parameters but one extent get their own constants."""
    a = _window(2, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), (10, 12, 1), "constant")
    b = _window(2, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), (7, 5, 1), "constant")
    lo, hi = np.array([[0, 3], [4, 5]], dtype=np.int64), np.array([[5, 6], [6, 9]], dtype=np.int64)
    for op in (a, b, a):
        ((got_lo, got_hi),) = intervals.op_needs(op, lo, hi, None)
        want = intervals.source(*intervals.padded(op, lo, hi), op.in_extents[0], op.mode)
        assert np.array_equal(got_lo, want[0]) and np.array_equal(got_hi, want[1])
