"""``bigpicture plan --plot plan.png``: the plan as a picture, for those who look rather than read.

    +-----------------------------+   +----------------------+
    | thumbnail of the input      |   | predicted time per   |
    |  tiles coloured by class,   |   | stage (forward,      |
    |  one read box per class     |   | recompute, backward, |
    |  dashed: its halo           |   | reads ...)           |
    +-----------------------------+   +----------------------+

A 3D input shows its three middle slices, each with the tiles that cross it. A tile's *class* is
its geometry (the shapes of its write and read boxes, and which image borders it touches): tiles of
one class cost the same, which is how the performance model walks a grid of millions of tiles.
matplotlib is an optional extra (``pip install matplotlib``).
"""

from __future__ import annotations

import numpy as np

from bigpicture.engine.plan import Plan
from bigpicture.errors import TilingError

THUMBNAIL = 1024  # longest side of the thumbnail, px


def plot_plan(path: str, plan: Plan, prediction, source=None) -> None:
    """Write the picture of ``plan`` (with ``prediction``'s times) to ``path`` (.png, .pdf, .svg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise TilingError("--plot needs matplotlib: pip install matplotlib") from e
    spatial = plan.input_shape[2:]
    if len(spatial) not in (2, 3):
        raise TilingError(f"--plot draws 2D and 3D inputs; this one has {len(spatial)} spatial dimensions.")
    views = [(0, 1, None)] if len(spatial) == 2 else [(1, 2, 0), (0, 2, 1), (0, 1, 2)]
    fig, axes = plt.subplots(1, len(views) + 1, figsize=(5.5 * (len(views) + 1), 5), squeeze=False)
    classes = tile_classes(plan)
    colours = plt.get_cmap("tab10" if len(set(classes)) <= 10 else "tab20")
    index = {key: i for i, key in enumerate(dict.fromkeys(classes))}
    for ax, (rows, cols, across) in zip(axes[0], views):
        _draw_tiles(
            ax, plan, classes, index, colours, rows, cols, across, _thumbnail(source, spatial, across)
        )
    _draw_stages(axes[0][-1], prediction)
    fig.suptitle(
        f"{' x '.join(map(str, spatial))} input, tile {' x '.join(map(str, plan.tile))}: {len(plan.tiles):,} "
        f"tiles in {len(index)} classes; {prediction.device}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tile_classes(plan: Plan) -> list[tuple]:
    """Per tile of ``plan``: its class, the shapes of its boxes and the image borders it touches."""
    spatial = plan.input_shape[2:]
    return [
        (
            tuple(w.shape for w in t.writes),
            t.read.shape,
            tuple((t.read.lo[d] == 0, t.read.hi[d] == n) for d, n in enumerate(spatial)),
        )
        for t in plan.tiles
    ]


def _draw_tiles(ax, plan, classes, index, colours, rows, cols, across, image) -> None:
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    spatial = plan.input_shape[2:]
    middle = None if across is None else spatial[across] // 2
    if image is not None:
        ax.imshow(image, extent=(0, spatial[cols], spatial[rows], 0), cmap="gray", interpolation="nearest")
    owned, halos, seen = [], [], set()
    for t, key in zip(plan.tiles, classes):
        if middle is not None and not t.box.lo[across] <= middle < t.box.hi[across]:
            continue  # a tile that does not cross this middle slice
        colour = colours(index[key] % colours.N)
        box, read = t.box, t.read
        owned.append(Rectangle((box.lo[cols], box.lo[rows]), box.shape[cols], box.shape[rows], color=colour))
        if key not in seen:  # one read box per class: the halo around that tile
            seen.add(key)
            halos.append(
                Rectangle((read.lo[cols], read.lo[rows]), read.shape[cols], read.shape[rows], fill=False,
                          edgecolor=colour, linestyle="--", linewidth=1.5)
            )  # fmt: skip
    ax.add_collection(
        PatchCollection(owned, match_original=True, alpha=0.35, edgecolor="black", linewidth=0.3)
    )
    for patch in halos:
        ax.add_patch(patch)
    ax.set_xlim(0, spatial[cols])
    ax.set_ylim(spatial[rows], 0)
    ax.set_aspect("equal")
    names = "zyx" if len(spatial) == 3 else " yx"
    ax.set_xlabel(f"{names[cols + (3 - len(spatial))]} (px)")
    ax.set_ylabel(f"{names[rows + (3 - len(spatial))]} (px)")
    where = "tiles" if across is None else f"{names[across]} = {middle} (middle): tiles"
    ax.set_title(f"{where} by class; dashed: a read box (halo) per class", fontsize=9)


def _draw_stages(ax, prediction) -> None:
    stages = [(s.name, s.seconds) for s in prediction.stages if s.seconds]
    ax.barh([n for n, _ in stages][::-1], [s for _, s in stages][::-1], color="tab:blue")
    ax.set_xlabel("predicted seconds")
    mode = "training step" if prediction.training else "inference"
    ax.set_title(
        f"{prediction.device}, {str(prediction.dtype).removeprefix('torch.')}, {mode}: "
        f"{prediction.time:.3g} s, peak {prediction.memory / 2**20:,.0f} MiB",
        fontsize=9,
    )


def _thumbnail(source, spatial, across) -> np.ndarray | None:
    """A small grey image of the input (its middle slice across ``across`` in 3D), or None.

    Rows are read one at a time at a stride, so a slide without a coarse level is never whole in memory.
    """
    if source is None:
        return None
    src = _coarse_level(source, spatial)
    shape = tuple(src.shape[2:])
    keep = [d for d in range(len(shape)) if d != across]
    step = max(1, max(shape[d] for d in keep) // THUMBNAIL)
    lines = []
    for r in range(0, shape[keep[0]], step):
        key = [slice(None), slice(None)]
        for d, n in enumerate(shape):
            key.append(
                slice(n // 2, n // 2 + 1) if d == across else slice(r, r + 1) if d == keep[0] else slice(None)
            )
        block = np.asarray(src[tuple(key)])[0]  # (C, ...): one row of the view, size-1 elsewhere
        lines.append(block.reshape(block.shape[0], -1)[:, ::step])
    image = np.stack(lines, axis=1).astype(np.float32)  # (C, rows, columns)
    grey = image[:3].mean(axis=0) if image.shape[0] in (3, 4) else image[0]
    lo, hi = np.percentile(grey, [1, 99])
    return np.clip((grey - lo) / max(hi - lo, 1e-12), 0, 1)


def _coarse_level(source, spatial):
    """A slide's coarsest level whose longest side still has ``THUMBNAIL`` px, else the source."""
    shapes = getattr(source, "level_shapes", None)
    path = getattr(source, "path", None)
    if not shapes or path is None or len(spatial) != 2:
        return source
    from bigpicture.io import open_slide

    fine = [i for i, s in enumerate(shapes) if max(s[2:]) >= THUMBNAIL]
    if not fine or fine[-1] == 0:
        return source
    try:
        return open_slide(path, level=fine[-1])
    except TilingError:
        return source
