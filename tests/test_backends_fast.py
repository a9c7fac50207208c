"""Torch's kernel family asked once per class of boxes (``conv_rates._classes``) equals torch's own
answer box by box (``conv_rates._select`` on each box, the real ``_select_conv_backend``) and the
old per-box ``backends_of`` (``tests/_old_backends.py``): hypothesis-made convolutions (1-3 d,
transposed, grouped, strided, dilated, batches of 0 to 17, float32/bfloat16/float64, one or two
threads) on boxes around every bound the classes read (empty, too small for the kernel, all ones,
oneDNN's 20,480 elements, 2**31 elements, negative lengths and int64 overflow: a class per box);
and ``conv_rates`` on rows against the old one, bit for bit."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import _old_backends as old
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_step_memo import _calibration

from bigpicture.perf import conv_rates
from bigpicture.perf.devices import load_calibration, local_cpu
from bigpicture.perf.rates import Rates

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(conv_rates, "_known", {})
    monkeypatch.setattr(old, "_known", {})
    monkeypatch.setattr(old, "_count", [0])
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@st.composite
def convolutions(draw):
    """(op, n, cin, cout, transposed, dtype, boxes): a convolution and boxes around its classes' bounds."""
    nd = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    cin = groups * draw(st.sampled_from([1, 2, 3, 8]))
    cout = groups * draw(st.sampled_from([1, 2, 5]))
    kernel = tuple(draw(st.lists(st.sampled_from([1, 1, 2, 3, 4, 5]), min_size=nd, max_size=nd)))
    step = tuple(draw(st.lists(st.sampled_from([1, 1, 2]), min_size=nd, max_size=nd)))
    dilation = tuple(draw(st.lists(st.sampled_from([1, 1, 2]), min_size=nd, max_size=nd)))
    n = draw(st.sampled_from([0, 1, 1, 2, 15, 16, 17]))
    dtype = draw(st.sampled_from(DTYPES))
    op = SimpleNamespace(groups=groups, kernel=kernel, step=step, dilation=dilation)
    reach = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
    # lengths about the kernel's reach, about oneDNN's bound over a plane, and about 2**31 elements
    plane = max(20480 // max(n * cin, 1), 1)
    side = max(math.isqrt(plane), 1)
    near = sorted({0, 1, 2, *reach, *(r - 1 for r in reach), side - 1, side, side + 1, plane, plane + 1, 40})
    limit = 300_000 if nd == 1 else 50_000  # a 1-d input is made contiguous by torch: allocated
    length = st.one_of(st.sampled_from([v for v in near if 0 <= v <= limit]), st.integers(0, 300))
    boxes = draw(st.lists(st.lists(length, min_size=nd, max_size=nd), min_size=1, max_size=25))
    if draw(st.booleans()):  # a box's corners of the plane bound, each of its axes
        boxes += [list(b) for b in itertools.product(*[[side - 1, side, side + 1]] * min(nd, 2))
                  for b in [b + (1,) * (nd - len(b))]]  # fmt: skip
    return op, n, cin, cout, transposed, dtype, boxes


def _rates(dtype) -> SimpleNamespace:
    return SimpleNamespace(gpu=False, measured=True, dtype=dtype)


def _torch_each(op, boxes, n, cin, cout, transposed, dtype) -> list:
    """Torch's answer for each box alone (``_select`` on one box)."""
    weight = (cin, cout // op.groups) if transposed else (cout, cin // op.groups)
    signature = ((n, cin), weight + op.kernel, op.step, op.dilation, op.groups, transposed, dtype)
    return [conv_rates._select(signature, [tuple(b)])[0] for b in boxes]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=convolutions(), threads=st.sampled_from([1, 2]), again=st.booleans())
def test_classes_answer_as_torch_box_by_box(case, threads, again):
    """Every box's family from its class equals torch's for the box alone and the old ``backends_of``'s;
    asked twice (the second from the store) where ``again``."""
    op, n, cin, cout, transposed, dtype, boxes = case
    torch.set_num_threads(threads)  # torch's answer may change with it: the stores emptied
    conv_rates._known.clear()
    old._known.clear()
    want = _torch_each(op, boxes, n, cin, cout, transposed, dtype)
    assert old.backends_of(op, boxes, n, cin, cout, transposed, _rates(dtype)) == want
    for _ in range(2 if again else 1):
        assert conv_rates.backends_of(op, boxes, n, cin, cout, transposed, _rates(dtype)) == want


def test_classes_on_named_boxes():
    """Boxes at the bounds of a 3x3 convolution of 16 channels, a batch of 1 (oneDNN past 1,280
    positions of a plane: 35x36 and 36x36), too small (2 long), empty, of ones (a 1x1 convolution),
    a 3-d box whose third length is past the plane's (still Slow3d's), and the families it gives."""
    op = SimpleNamespace(groups=1, kernel=(3, 3), step=(1, 1), dilation=(1, 1))
    boxes = [[35, 36], [36, 36], [36, 35], [2, 40], [0, 5], [3, 3], [1000, 3]]
    want = _torch_each(op, boxes, 1, 16, 16, False, torch.float32)
    assert want[0] != want[1] and want[3] is None and want[4] is None
    assert conv_rates.backends_of(op, boxes, 1, 16, 16, False, _rates(torch.float32)) == want
    ones = SimpleNamespace(groups=1, kernel=(1, 1), step=(1, 1), dilation=(1, 1))
    boxes = [[1, 1], [1, 2], [2, 1], [200, 200]]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        conv_rates._known.clear()
        want = _torch_each(ones, boxes, 1, 1, 4, False, torch.float32)
        assert conv_rates.backends_of(ones, boxes, 1, 1, 4, False, _rates(torch.float32)) == want
    deep = SimpleNamespace(groups=1, kernel=(3, 3, 3), step=(1, 1, 1), dilation=(1, 1, 1))
    boxes = [[4, 4, 5000], [40, 40, 3], [3, 3, 3]]
    want = _torch_each(deep, boxes, 1, 16, 16, False, torch.float32)
    assert conv_rates.backends_of(deep, boxes, 1, 16, 16, False, _rates(torch.float32)) == want


def test_negative_and_overflowing_boxes_are_classes_of_their_own(monkeypatch):
    """Negative lengths (torch's ``expand`` keeps a length of -1, refuses others) and lengths whose
    products pass 2**62: each distinct box asked of torch, as the old code did, nothing stored."""
    op = SimpleNamespace(groups=1, kernel=(3, 3), step=(1, 1), dilation=(1, 1))
    asked = []
    select = conv_rates._select
    monkeypatch.setattr(conv_rates, "_select", lambda sig, boxes: asked.append(len(boxes)) or select(sig, boxes))
    for boxes in ([[5, -1], [40, 40], [5, -1], [-2, 3]], [[1 << 40, 1 << 30], [40, 40], [40, 40]]):
        want = _torch_each(op, boxes, 1, 16, 16, False, torch.float32)
        assert conv_rates.backends_of(op, boxes, 1, 16, 16, False, _rates(torch.float32)) == want
    assert asked[-1] == 2 and not conv_rates._known


CALIBRATIONS = {"made up": _calibration, "this machine's": load_calibration}


@pytest.mark.parametrize("calibration", CALIBRATIONS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                 HealthCheck.function_scoped_fixture])  # fmt: skip
@given(case=convolutions(), seed=st.integers(0, 1 << 16), rows=st.integers(1, 200))
def test_conv_rates_equal_the_old(calibration, case, seed, rows):
    """``conv_rates`` on rows of the drawn boxes (repeated, some of no work) and positions (repeated,
    small and past 2**54: rated as lists), asked twice, against the old per-box one."""
    op, n, cin, cout, transposed, dtype, boxes = case
    cal = CALIBRATIONS[calibration]()
    if cal is None:
        pytest.skip("this machine is not calibrated")
    new, was = Rates(local_cpu(), torch.float32, cal), Rates(local_cpu(), torch.float32, cal)
    rng = np.random.default_rng(seed)
    lengths = np.array(boxes, dtype=np.int64)[rng.integers(0, len(boxes), rows)]
    pool = rng.integers(0, 1 << (20 if seed % 5 else 56), max(rows // 4, 1))
    positions = pool[rng.integers(0, len(pool), rows)]
    nd, stride = len(op.kernel), max(op.step)
    case3 = (transposed, cin // (1 if transposed else op.groups), math.prod(op.kernel))
    fan_in = case3[1] * case3[2]
    args = (op, lengths, positions, n, cin, cout, transposed, nd, fan_in, stride, case3)
    for _ in range(2):
        got, want = conv_rates.conv_rates(*args, new), old.conv_rates(*args, was)
        assert [a.tolist() for a in got] == [a.tolist() for a in want]
