"""A node's distinct steps over the combinations of its per-dimension geometries (``classes._combos``
as it was, tests/_old_node_combos.py: the table filled by broadcasting, distinct rows by ``np.lexsort``)
equal what the code before made (``tests/_old_combos.py``, verbatim) and what the small grids' Python
path made (``_small_combos``):
every field, dtype and shape, on random geometries (1D to 3D, repeated lengths so that rows repeat,
flags, tile counts, with and without the input's shape in the key) and on the lengths a window's
reach gives (``node_rows.lengths_of``).
"""

from __future__ import annotations

import _old_combos
import _old_node_combos as classes
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from test_random_architectures import examples

from bigpicture.perf.node_rows import lengths_of


def _fields(result) -> list:
    rows, tiles, inverse = result
    out = [rows.numel, rows.padded, rows.extra, rows.outside, rows.copied, tiles, inverse]
    return out + [i for i, _ in rows.inputs] + [n for _, n in rows.inputs]


def assert_same(got, want) -> None:
    for a, b in zip(_fields(got), _fields(want), strict=True):
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        else:
            assert a == b


@st.composite
def geometries(draw):
    nd, inputs = draw(st.integers(1, 3)), draw(st.integers(0, 2))
    boxes = ["node", *[f"in{k}" for k in range(inputs)]]
    pool = draw(st.lists(st.integers(0, 40), min_size=1, max_size=4))  # few values: products repeat
    per_dim, lengths = [], []
    for _ in range(nd):
        count = draw(st.integers(1, 7))
        flags = [(None, draw(st.booleans()), draw(st.booleans()), 0) for _ in range(count)]
        tiles = draw(st.lists(st.integers(1, 10**4), min_size=count, max_size=count))
        per_dim.append((tuple(range(count)), list(range(count)), tiles, flags))
        q = len(boxes) + 2
        lengths.append([draw(st.lists(st.sampled_from(pool), min_size=q, max_size=q)) for _ in range(count)])
    return per_dim, lengths, boxes, draw(st.booleans())


@examples(400)
@given(geometries())
def test_combos_equal_the_old_and_the_small(geometry):
    got = classes._combos(*geometry)
    assert_same(got, _old_combos._combos(*geometry))
    assert_same(got, classes._small_combos(*geometry))


@examples(200)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 4), st.integers(1, 5), st.booleans(),
       st.integers(0, 2**16))  # fmt: skip
def test_combos_of_windows_equal_the_old(nd, kinds, stride, reach, shaped, seed):
    """Square and non-square grids of a window's geometries (lengths from its reach, as the planner's)."""
    rng = np.random.default_rng(seed)
    window = tuple((stride, reach) for _ in range(nd))
    per_dim, lengths = [], []
    for d in range(nd):
        values = [
            ((int(a), int(b)), bool(o), bool(c), 1)
            for a, b, o, c in rng.integers(1, 6, (kinds, 4)) % [6, 6, 2, 2]
        ]
        values = list(dict.fromkeys(values))  # distinct, as ``_Grid.features`` gives them
        tiles = rng.integers(1, 1000, len(values)).tolist()
        per_dim.append((tuple(range(len(values))), list(range(len(values))), tiles, values))
        lengths.append([lengths_of(window, v, d) for v in values])
    geometry = (per_dim, lengths, ["node", "x"], shaped)
    assert_same(classes._combos(*geometry), _old_combos._combos(*geometry))
