"""Box: an N-d half-open integer region, the one geometric value of bigpicture.

    lo[0]            hi[0]
      |rrrr|wwwwwwwwwwww|rrrr|      read box = write box .grow(halo)
           lo          hi

A box never means "everything": an empty box has ``lo == hi`` in some dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product


@dataclass(frozen=True)
class Box:
    lo: tuple[int, ...]
    hi: tuple[int, ...]

    def __post_init__(self) -> None:
        assert len(self.lo) == len(self.hi), (self.lo, self.hi)
        object.__setattr__(self, "lo", tuple(map(int, self.lo)))
        object.__setattr__(self, "hi", tuple(map(int, self.hi)))

    @classmethod
    def _of(cls, lo: tuple[int, ...], hi: tuple[int, ...]) -> Box:
        """A box from tuples of ints already checked: the hot paths of the planner's walks make
        hundreds of thousands of boxes, and the dataclass's init and checks would be most of their cost."""
        box = object.__new__(cls)
        object.__setattr__(box, "lo", lo)
        object.__setattr__(box, "hi", hi)
        return box

    @classmethod
    def from_shape(cls, shape) -> Box:
        return cls((0,) * len(shape), tuple(shape))

    @property
    def ndim(self) -> int:
        return len(self.lo)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple([h - lo if h > lo else 0 for lo, h in zip(self.lo, self.hi)])

    def length(self, d: int) -> int:
        """``shape[d]`` without building the whole shape (the planner asks per dimension)."""
        n = self.hi[d] - self.lo[d]
        return n if n > 0 else 0

    @property
    def numel(self) -> int:
        n = 1
        for lo, h in zip(self.lo, self.hi):
            if h <= lo:
                return 0
            n *= h - lo
        return n

    @property
    def empty(self) -> bool:
        for lo, h in zip(self.lo, self.hi):  # a loop, not any(): the planner asks millions of times
            if h <= lo:
                return True
        return False

    def grow(self, lo, hi=None) -> Box:
        """Grow by ``lo`` below and ``hi`` above (ints or per-dimension tuples; negative shrinks)."""
        lo = _per_dim(lo, self.ndim)
        hi = lo if hi is None else _per_dim(hi, self.ndim)
        return Box(tuple(a - g for a, g in zip(self.lo, lo)), tuple(b + g for b, g in zip(self.hi, hi)))

    def shift(self, offset) -> Box:
        offset = _per_dim(offset, self.ndim)
        return Box(
            tuple(a + o for a, o in zip(self.lo, offset)), tuple(b + o for b, o in zip(self.hi, offset))
        )

    def intersect(self, other: Box) -> Box:
        lo = tuple(map(max, self.lo, other.lo))
        return Box._of(lo, tuple(map(max, map(min, self.hi, other.hi), lo)))

    def clip(self, shape) -> Box:
        """This box inside ``[0, shape)`` (the same as intersecting with ``Box.from_shape(shape)``)."""
        for a, b, n in zip(self.lo, self.hi, shape):  # most boxes the planner clips are inside already
            if a < 0 or b <= a or b > n:
                break
        else:
            return self
        lo = [a if a > 0 else 0 for a in self.lo]
        hi = [a if b <= a else b if b < n else max(int(n), a) for a, b, n in zip(lo, self.hi, shape)]
        return Box._of(tuple(lo), tuple(hi))

    def hull(self, other: Box) -> Box:
        lo, hi, olo, ohi = self.lo, self.hi, other.lo, other.hi
        if lo == olo and hi == ohi:  # users that need the same box: common in the reverse walk
            return self
        if self.empty:
            return other
        if other.empty:
            return self
        return Box._of(tuple(map(min, lo, olo)), tuple(map(max, hi, ohi)))

    def contains(self, other: Box) -> bool:
        return other.empty or all(
            a <= c and d <= b for a, b, c, d in zip(self.lo, self.hi, other.lo, other.hi)
        )

    def relative_to(self, outer: Box) -> Box:
        """This box in the coordinates of ``outer`` (whose lo becomes the origin)."""
        return self.shift(tuple(-v for v in outer.lo))

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi))

    def dim(self, d: int) -> tuple[int, int]:
        return self.lo[d], self.hi[d]

    def with_dim(self, d: int, lo: int, hi: int) -> Box:
        return Box(self.lo[:d] + (lo,) + self.lo[d + 1 :], self.hi[:d] + (hi,) + self.hi[d + 1 :])

    @classmethod
    def from_dims(cls, dims) -> Box:
        dims = list(dims)
        return cls._of(tuple([int(a) for a, _ in dims]), tuple([int(b) for _, b in dims]))

    def __str__(self) -> str:
        return "[" + ", ".join(f"{a}:{b}" for a, b in zip(self.lo, self.hi)) + ")"


def grid(boxes_per_dim) -> list[tuple[tuple[int, ...], Box]]:
    """All combinations of per-dimension intervals, with their grid index, in row-major order."""
    out = []
    for index in product(*[range(len(b)) for b in boxes_per_dim]):
        out.append((index, Box.from_dims(boxes_per_dim[d][i] for d, i in enumerate(index))))
    return out


def _per_dim(v, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    assert len(v) == n, (v, n)
    return v
