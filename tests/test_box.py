"""Box's fast paths (`_of`, `clip`, `intersect`, `hull`) against the plain definitions, on random boxes."""

from hypothesis import given, settings
from hypothesis import strategies as st

from bigpicture.engine.box import Box

coord = st.integers(-50, 50)


@st.composite
def boxes(draw, nd):
    lo = tuple(draw(coord) for _ in range(nd))
    return Box(lo, tuple(a + draw(st.integers(-5, 40)) for a in lo))


@st.composite
def pairs(draw):
    nd = draw(st.integers(1, 3))
    return draw(boxes(nd)), draw(boxes(nd)), tuple(draw(st.integers(0, 60)) for _ in range(nd))


def reference_intersect(a: Box, b: Box) -> Box:
    lo = tuple(max(x, y) for x, y in zip(a.lo, b.lo))
    return Box(lo, tuple(max(min(x, y), low) for x, y, low in zip(a.hi, b.hi, lo)))


@settings(max_examples=300, deadline=None)
@given(pairs())
def test_fast_paths_equal_the_definitions(case):
    a, b, shape = case
    assert a.intersect(b) == reference_intersect(a, b)
    clipped = a.clip(shape)
    assert clipped == reference_intersect(a, Box((0,) * len(shape), shape))
    assert all(type(v) is int for v in clipped.lo + clipped.hi)
    hull = a.hull(b)
    if not a.empty and not b.empty:
        assert hull == Box(tuple(map(min, a.lo, b.lo)), tuple(map(max, a.hi, b.hi)))
    else:
        assert hull == (b if a.empty else a)


def test_fast_constructor_is_the_same_value():
    fast, plain = Box._of((1, 2), (3, 4)), Box((1, 2), (3, 4))
    assert fast == plain and hash(fast) == hash(plain) and {fast: 1}[plain] == 1
    assert Box((0, 0), (5, 5)).clip((3, 7)) == Box((0, 0), (3, 5))
