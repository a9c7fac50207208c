"""The demo's outputs: the results table, heatmaps as PNG overlays and as pyramidal OME-TIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from wsi_dataset import MPP, NOTICE
from wsi_metrics import CELL, on_grid

import bigpicture as bp

MiB = 2**20


def table(rows: list[dict]) -> list[str]:
    """One line per method: AUC with its interval, localisation, memory and time."""
    head = (f"{'method':<34}{'AUC [95% CI]':>20}{'mass in lesion':>16}{'pixel AUROC':>13}"
            f"{'predicted peak':>16}{'measured peak':>15}{'s/epoch':>9}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        lo, hi = r["auc_ci"]
        measured = f"{r['measured_peak'] / MiB:,.0f} MiB" if r.get("measured_peak") else "-"
        lines.append(
            f"{r['name']:<34}{r['auc']:>8.3f} [{lo:.2f}, {hi:.2f}]{r['mass']:>11.3f} ({r['chance']:.3f})"
            f"{r['pixel_auroc']:>9.3f}{r['memory'] / MiB:>12,.0f} MiB{measured:>15}{r['seconds']:>9.1f}"
        )
    lines.append(
        "mass in lesion: share of the heatmap's mass over tissue inside the lesion (chance: the lesion's "
        "share of the tissue); pixel AUROC: lesion against other tissue, 16 px cells; both averaged over "
        "the held-out positive slides. Peaks: one training step; measured = peak RSS above the process's "
        "RSS after a warm-up step, in a fresh process."
    )
    return lines


def lesion_outline(lesion: np.ndarray, width: int = 3) -> np.ndarray:
    return lesion & ~(np.roll(lesion, width, 0) & np.roll(lesion, -width, 0)
                      & np.roll(lesion, width, 1) & np.roll(lesion, -width, 1))  # fmt: skip


def overlay_png(slide, heats: dict[str, dict], path: Path, width: int = 360) -> Path:
    """The slide with its lesion outlined in green, then each method's heatmap over it (red = high)."""
    from PIL import Image, ImageDraw

    rgb = np.moveaxis(np.asarray(bp.io.open_slide(slide.path)[0]), 0, -1).copy()
    tissue, lesion = slide.load_masks()
    rgb[lesion_outline(lesion)] = (0, 200, 0)
    h, w = rgb.shape[:2]
    size = (width, round(width * h / w))
    panels = [("slide, lesion outlined", Image.fromarray(rgb).resize(size, Image.BILINEAR))]
    base = np.asarray(panels[0][1], np.float32)
    for name, r in heats.items():
        heat = on_grid(r["heat"], r["stride"], (h, w))
        heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
        small = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize(size, Image.NEAREST)) / 255.0
        red = np.stack([255 * small, 40 * (1 - small), 255 * (1 - small)], -1)
        panels.append((name, Image.fromarray((0.45 * base + 0.55 * red).astype(np.uint8))))
    canvas = Image.new("RGB", (width * len(panels), size[1] + 18), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, im) in enumerate(panels):
        canvas.paste(im, (i * width, 18))
        draw.text((i * width + 4, 3), name, fill="black")
    draw.text((4, size[1] + 4), NOTICE, fill="gray")
    canvas.save(path)
    return path


def colours(heat: np.ndarray) -> np.ndarray:
    """0..1 values to (3, ...) uint8 RGB: blue (low) to red (high)."""
    h = np.clip(heat, 0, 1)
    return np.rint(np.stack([255 * h, 40 * (1 - h), 255 * (1 - h)])).astype(np.uint8)


def heatmap_tiff(slide, heat: np.ndarray, stride: int, path: Path) -> Path:
    """The heatmap (0..1) in colour at the slide's resolution (each value repeated over its ``stride``
    px), a pyramidal OME-TIFF with the slide's pixel size: it overlays the slide in QuPath and napari.
    RGB, as ``bp.io.write_pyramid`` cannot write a single channel yet (tifffile rejects its planar
    configuration for one sample)."""
    h, w = bp.io.open_slide(slide.path).shape[2:]
    full = np.repeat(np.repeat(heat, stride, 0), stride, 1)[:h, :w]
    full = np.pad(full, ((0, h - full.shape[0]), (0, w - full.shape[1])), "edge")
    return bp.io.write_pyramid(colours(full), path, mpp=MPP, tile=256, levels=3)


def check_tiff(path: Path, heat: np.ndarray, stride: int, shape) -> str:
    """Read the heatmap's pyramid back (tifffile and zarr): levels halve, pixel size is the slide's."""
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        levels = [lv.shape for lv in tif.series[0].levels]
        meta = tif.ome_metadata
        store = tif.series[0].aszarr()
        level0 = np.moveaxis(np.asarray(zarr.open(store, mode="r")["0"]), -1, 0)
    expected = [(-(-shape[0] // 2**k), -(-shape[1] // 2**k)) for k in range(len(levels))]
    ok_levels = [lv[:2] for lv in levels] == expected and len(levels) >= 2
    ok_mpp = f'PhysicalSizeX="{MPP}"' in meta and f'PhysicalSizeY="{MPP}"' in meta
    cell = colours(heat)
    ok_values = np.array_equal(level0[:, ::stride, ::stride][:, : cell.shape[1], : cell.shape[2]], cell)
    if not (ok_levels and ok_mpp and ok_values):
        raise AssertionError(f"{path}: levels {levels} (expected {expected}), pixel size ok: {ok_mpp}, "
                             f"values ok: {ok_values}")  # fmt: skip
    return f"{path.name}: {len(levels)} levels {[lv[:2] for lv in levels]}, {MPP} um/px, values match"


__all__ = ["CELL", "check_tiff", "heatmap_tiff", "overlay_png", "table"]
