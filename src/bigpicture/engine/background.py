"""Background: tissue masks for slides, and exact reuse of the output of constant tiles.

A tile whose read box is one constant value and lies strictly inside the image computes the
same ops on the same numbers as every other such tile *of the same geometry*, so its outputs
are bitwise the same: compute one, reuse it for the rest.

    image  |..............................................|
    tile a      |rr|  wwww  |rr|     all background, interior  -> computed once
    tile b                    |rr|  wwww  |rr|               -> reused from tile a
    tile c |rr|wwww|rr|                  touches the border  -> computed (padding differs)

Same geometry means translates on every node's own grid: shifting the input by D pixels
shifts a node of stride s by D/s pixels, an integer when D is a multiple of every stride's
numerator. Tiles are grouped by their boxes (needs of every node) taken relative to such a
shift. Interpolation weights are computed from absolute coordinates, so they are identical
for translates only when the scale is dyadic (exact in binary) and align_corners is off; a
plan with other resampling keeps computing every tile.

``MaskedSource`` sets every pixel outside a (low-resolution) tissue mask to one value, so
the image with background removed is defined exactly, and regions wholly outside the mask
are known constant without reading the slide at all.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from fractions import Fraction

import numpy as np
import torch

from bigpicture.engine.plan import Plan, Tile
from bigpicture.engine.tiles import geometry, translation_period
from bigpicture.errors import TilingError
from bigpicture.io.sources import Region, Source, as_source, region_shape


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that maximises the between-class variance of ``values`` (Otsu, 1979)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return lo
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)[:-1]
    mean_cum = np.cumsum(counts * centres)[:-1]
    below, above = weight, counts.sum() - weight
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_below = mean_cum / below
        mean_above = (np.sum(counts * centres) - mean_cum) / above
        between = below * above * (mean_below - mean_above) ** 2
    return float(edges[1:-1][np.nanargmax(between)])


def tissue_mask(slide, max_size: int = 2048, dilate: int = 2) -> np.ndarray:
    """A boolean (h, w) mask of tissue on a small level: Otsu thresholds of darkness and, for RGB,
    of saturation (max - min over channels: stained tissue is coloured, glass is grey).

    ``slide`` is a path or a slide source (``bp.io.open_slide``). The coarsest level whose
    longest side is at most ``max_size`` is read (or level 0, subsampled in strips). The mask is
    grown by ``dilate`` mask pixels so that faint tissue edges stay in.
    """
    thumb = _thumbnail(slide, max_size).astype(np.float64)
    gray = thumb.mean(axis=0)
    mask = gray < otsu_threshold(gray)
    if thumb.shape[0] == 3:
        saturation = thumb.max(axis=0) - thumb.min(axis=0)
        mask |= saturation > otsu_threshold(saturation)
    for _ in range(max(0, dilate)):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def _thumbnail(slide, max_size: int) -> np.ndarray:
    from bigpicture.io.slides import open_slide

    source = open_slide(slide) if isinstance(slide, (str, os.PathLike)) else slide
    shapes = getattr(source, "level_shapes", (tuple(source.shape),))
    small = [k for k, s in enumerate(shapes) if max(s[2:]) <= max_size]
    if small and hasattr(source, "path"):
        try:
            source = open_slide(source.path, level=small[0], channels="all" if shapes[0][1] > 4 else "rgb")
        except TilingError:  # e.g. OpenSlide refusing a level with a non-integer downsample
            pass
    _, c, h, w = source.shape
    step = max(1, math.ceil(max(h, w) / max_size))
    rows = []
    for y in range(0, h, step * 256):
        strip = source[0, :, y : min(h, y + step * 256)]
        rows.append(np.asarray(strip)[:, ::step, ::step])
    return np.concatenate(rows, axis=1)


class MaskedSource(Source):
    """``source`` with every pixel outside ``mask`` set to ``fill``.

    ``mask`` is a boolean (h, w) array over the whole image at any resolution; image pixel
    (y, x) of an (H, W) image takes mask pixel (y * h // H, x * w // W). That is a fixed
    function of position, so tiles of the masked image equal slices of the whole masked image.
    """

    def __init__(self, source, mask: np.ndarray, fill=255):
        self.source = as_source(source)
        self.shape, self.dtype = self.source.shape, self.source.dtype
        self.mask = np.ascontiguousarray(mask, dtype=bool)
        if self.mask.ndim != len(self.shape) - 2:
            raise TilingError(
                f"a tissue mask of shape {self.mask.shape} does not fit a source of shape {self.shape}: "
                f"give one mask value per position of the {len(self.shape) - 2} spatial dimensions"
            )
        fill = np.asarray(fill, dtype=self.dtype)
        if fill.ndim and fill.shape != (self.shape[1],):
            raise TilingError(f"fill {fill.tolist()} must be one value, or one per channel ({self.shape[1]})")
        self.fill = fill
        self.hint = getattr(self.source, "hint", "")

    @property
    def background(self):
        return self.fill.tolist()

    def _mask(self, spatial) -> np.ndarray:
        index = [
            (np.arange(s.start, s.stop) * m // n)
            for s, m, n in zip(spatial, self.mask.shape, self.shape[2:], strict=True)
        ]
        return self.mask[np.ix_(*index)]

    def filled(self, region: Region) -> np.ndarray:
        fill = self.fill
        if fill.ndim:
            fill = fill[region[1]].reshape(-1, *(1,) * (len(region) - 2))
        return np.broadcast_to(fill, region_shape(region)).copy()

    def constant_at(self, spatial: tuple[slice, ...]) -> bool:
        """True when every pixel of the spatial region is ``fill``, known from the mask alone."""
        return not self._mask(spatial).any()

    def read(self, region: Region) -> np.ndarray:
        inside = self._mask(region[2:])
        if not inside.any():
            return self.filled(region)
        return np.where(inside, np.asarray(self.source[region]), self.filled(region))

    def identity(self) -> dict:
        digest = hashlib.sha256(np.packbits(self.mask).tobytes() + str(self.mask.shape).encode()).hexdigest()
        inner = self.source.identity()
        return {**super().identity(), "fill": self.background, "mask": digest[:16], "source": inner}


class BackgroundTiles:
    """Reuses the outputs of interior tiles whose read box is all ``value`` (see the module doc).

    ``value`` is in the units the model sees (after any source transform and the conversion to
    the plan's dtype): one number, or one per channel.
    """

    def __init__(self, plan: Plan, value, device: torch.device):
        self.plan, self.split = plan, plan.split
        value = torch.as_tensor(value, dtype=plan.dtype, device=device)
        self.value = value.reshape(1, -1, *(1,) * len(plan.tile)) if value.ndim else value
        self.outputs: dict = {}
        self.skipped = 0
        self.why_not = _why_not_exact(self.split)
        if self.why_not:
            warnings.warn(f"background skipping is off: {self.why_not}; every tile is computed", stacklevel=3)
        self.period = translation_period(self.split)

    def key(self, tile: Tile):
        """Tiles with equal keys compute the same on the same input; None: never reuse this tile."""
        extent = self.plan.input_shape[2:]
        if self.why_not or any(
            lo <= 0 or hi >= n for lo, hi, n in zip(tile.read.lo, tile.read.hi, extent, strict=True)
        ):
            return None
        free = (True,) * len(extent)
        return geometry(self.split, tile, self.plan.needs(tile), self.period, free)

    def is_background(self, x: torch.Tensor) -> bool:
        return bool((x == self.value).all())

    def shared(self, key, compute) -> tuple[dict, bool]:
        """The outputs of background group ``key``: ``compute()`` for its first tile, then reused.

        Returns the outputs and whether they were reused."""
        reused = key in self.outputs
        if not reused:
            self.outputs[key] = compute()
        return self.outputs[key], reused

    def known(self, key) -> bool:
        return key is not None and key in self.outputs


def _why_not_exact(split) -> str:
    """Why translates of a tile may compute different bits (empty if they cannot)."""
    for node, op in split.ops.items():
        if split.roles.get(node) != "spatial":
            continue
        if getattr(op, "why_not_background", ""):  # e.g. a read of a global stage's output
            return f"`{node.name}`: {op.why_not_background}"
        if getattr(op, "align_corners", False):
            return f"`{node.name}` interpolates with align_corners=True (weights depend on the position)"
        if hasattr(op, "scales") and not all(_dyadic(f) for f in op.stride):
            return f"`{node.name}` resamples by a non-power-of-two factor (weights depend on the position)"
    return ""


def _dyadic(f: Fraction) -> bool:
    return f.numerator & (f.numerator - 1) == 0 and f.denominator & (f.denominator - 1) == 0
