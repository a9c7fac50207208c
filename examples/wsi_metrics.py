"""Held-out metrics of the demo: slide AUC with a bootstrap interval, lesion localisation,
and peak memory of one step measured in a fresh process.

Heatmaps of every method are compared on one grid of ``CELL`` x ``CELL`` px cells of level 0:
a method's map with a coarser stride is repeated onto it, and the masks are averaged over each
cell (a cell is lesion, or tissue, when at least half of it is).
"""

from __future__ import annotations

import sys

import numpy as np

CELL = 16


def auc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); nan with one class only."""
    scores, labels = np.asarray(scores, float).ravel(), np.asarray(labels, bool).ravel()
    n1, n0 = labels.sum(), (~labels).sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2)[inverse.ravel()]  # average rank of each tie group, from 1
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_auc(scores, labels, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the AUC over slides resampled with replacement (resamples with one
    class only are skipped)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, int)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        pick = rng.integers(0, len(scores), len(scores))
        if 0 < labels[pick].sum() < len(pick):
            values.append(auc(scores[pick], labels[pick]))
    if not values:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def cells(mask: np.ndarray, cell: int = CELL) -> np.ndarray:
    """The share of each ``cell`` x ``cell`` block that ``mask`` covers (edge blocks padded with 0)."""
    h, w = mask.shape
    padded = np.zeros((-(-h // cell) * cell, -(-w // cell) * cell), np.float32)
    padded[:h, :w] = mask
    return padded.reshape(padded.shape[0] // cell, cell, padded.shape[1] // cell, cell).mean(axis=(1, 3))


def on_grid(heat: np.ndarray, stride: int, shape: tuple[int, int], cell: int = CELL) -> np.ndarray:
    """A map with one value per ``stride`` px, repeated onto the grid of ``cell`` px of a ``shape`` image."""
    if stride % cell:
        raise ValueError(f"a heatmap's stride ({stride}) must be a multiple of the cell ({cell})")
    rep = stride // cell
    grid = np.repeat(np.repeat(np.asarray(heat, np.float64), rep, 0), rep, 1)
    rows, cols = -(-shape[0] // cell), -(-shape[1] // cell)
    if grid.shape[0] < rows or grid.shape[1] < cols:  # a map of a cropped input: pad with its edge
        grid = np.pad(grid, ((0, max(0, rows - grid.shape[0])), (0, max(0, cols - grid.shape[1]))), "edge")
    return grid[:rows, :cols]


def localisation(mass: np.ndarray, tissue: np.ndarray, lesion: np.ndarray) -> dict:
    """How well a non-negative heatmap ``mass`` (on the cell grid) finds the lesion of one slide.

    ``mass_in_lesion``: share of the heatmap's mass over tissue that lies in lesion cells;
    ``chance``: the same for a uniform map (the lesion's share of the tissue cells);
    ``pixel_auroc``: AUROC of the map's values, lesion cells against other tissue cells.
    """
    t, les = cells(tissue) >= 0.5, cells(lesion) >= 0.5
    t |= les
    m = np.clip(mass, 0, None)
    total = m[t].sum()
    return {
        "mass_in_lesion": float(m[les].sum() / total) if total > 0 else float("nan"),
        "chance": float(les.sum() / t.sum()),
        "pixel_auroc": auc(mass[t], les[t]),
    }


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM) in bytes, since start or the last ``reset_peak``."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux: ``/proc/self/clear_refs``); False where impossible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
