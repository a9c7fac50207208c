"""The slide-label method that learns here: a self-supervised trunk, pseudo-labels from the negative
slides, a cell head. No masks anywhere; slide labels are used twice: every cell of a negative slide
is host tissue, and a positive slide holds a lesion somewhere.

1. **SimCLR** (Chen et al., 2020) pretrains the trunk without labels: two views of a tissue region
   of a training slide (random 64 px crops of a 128 px region, one of the 8 turns, per-channel
   contrast and brightness jitter, no scale change: the lesion's nuclei are 4x the host's) are pulled
   together and away from the other regions of the batch (NT-Xent on a small projection of the
   trunk's mean-pooled features). Then its BatchNorms are calibrated and frozen, as everywhere.
2. The trunk's features of every training slide, one per 16 px cell, **tile by tile**
   (``bp.tiled(trunk, memory=budget)``), the inner map only (``wsi_models.inner``).
3. **Pseudo-labels**: each cell of a positive training slide is scored by how unlike the negative
   slides it is (the mean distance to its ``KNN`` nearest of ``ref_cells`` cells of the negative
   training slides, standardised features); its ``FRACTION`` most unusual cells are called lesion,
   every cell of a negative slide host. Alone, this anomaly score does not find the lesion (host
   tissue has rare places too: piece seams, the cut edge; RESULTS.md), but among a positive slide's
   most unusual 2% the lesion is about 10% instead of 0.5%.
4. A **head** (two 1x1 convolutions, 64 -> 32 -> 1) is fitted on those cells, class-balanced, with
   L-BFGS; the standardisation is folded into its first convolution.
5. The **slide score**: the score map of trunk and head (one tiled pass: a convolutional network),
   the mean over ``REGION`` x ``REGION`` cells around each cell (a lesion is a compact blob of cells,
   a false alarm mostly a lone cell), the mean of its ``TOP`` highest values. The heatmap is the
   sigmoid of that region map.

Everything after the trunk is per position except the region mean, which runs on the small score
map after the tiled pass, as every method's readout does.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from wsi_methods import budget_bytes, choose_batch, tissue_corners, tissue_patches
from wsi_models import STRIDE, build, calibrate_batchnorm, inner, normalise, outer

import bigpicture as bp

FRACTION = 0.02  # a positive slide's most unusual cells called lesion (the lesion is about 0.5% of a slide)
KNN = 3  # the anomaly: the mean distance to this many nearest negative cells
REGION = 5  # the slide score reads the mean over REGION x REGION cells (a lesion is about 9 cells across)
TOP = 4  # ... and averages the TOP highest of them
HIDDEN = 32


class Trunk(nn.Module):
    """The trunk's features (1, 64, H/16, W/16) of a raw uint8 slide: what ``bp.tiled`` runs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.map.features(x)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view's partner is the positive, the batch's other views the negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    s = z @ z.T / temperature
    s.fill_diagonal_(-1e9)
    n = z1.shape[0]
    return F.cross_entropy(s, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


def jittered_view(regions: torch.Tensor, crop: int, jitter: float, rng: np.random.Generator) -> torch.Tensor:
    """A random ``crop`` of each region, one of the 8 turns for the batch, per-channel contrast and
    brightness jitter (float 0..255)."""
    n, r = regions.shape[0], regions.shape[-1] - crop
    ys, xs = rng.integers(0, r + 1, n), rng.integers(0, r + 1, n)
    v = torch.stack([regions[i, :, ys[i] : ys[i] + crop, xs[i] : xs[i] + crop] for i in range(n)]).float()
    v = torch.rot90(v, int(rng.integers(4)), (2, 3))
    v = v.flip(-1) if rng.random() < 0.5 else v
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    scale = 1 + jitter * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    shift = 127.5 * jitter * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    mean = v.mean(dim=(2, 3), keepdim=True)
    return ((v - mean) * scale + mean + shift).clamp(0, 255)


def nearest_distance(cells: torch.Tensor, ref: torch.Tensor, k: int = KNN, chunk: int = 256) -> torch.Tensor:
    """The mean distance of each row of ``cells`` to its ``k`` nearest rows of ``ref``, in chunks of
    ``chunk`` rows (a chunk's distances: chunk x len(ref) floats)."""
    return torch.cat([torch.cdist(c, ref).topk(k, largest=False).values.mean(1) for c in cells.split(chunk)])


def fit_head(x: torch.Tensor, y: torch.Tensor, seed: int, hidden: int = HIDDEN, decay: float = 1e-3):
    """A 2-layer perceptron on standardised cells, class-balanced logistic loss with weight decay,
    L-BFGS to convergence (200 iterations at most)."""
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 1))
    n1, n0 = float(y.sum()), float(len(y) - y.sum())
    w = torch.where(y > 0, 0.5 / n1, 0.5 / n0)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(head(x)[:, 0], y, reduction="none") * w).sum()
        loss = loss + decay * sum((m.weight**2).sum() for m in head if isinstance(m, nn.Linear))
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def as_convolutions(head: nn.Sequential, mean: torch.Tensor, std: torch.Tensor) -> nn.Sequential:
    """The fitted head on raw features, as 1x1 convolutions: standardisation folded into the first."""
    first, last = head[0], head[2]
    c1, c2 = nn.Conv2d(first.in_features, first.out_features, 1), nn.Conv2d(last.in_features, 1, 1)
    with torch.no_grad():
        weight = first.weight / std
        c1.weight.copy_(weight[:, :, None, None])
        c1.bias.copy_(first.bias - weight @ mean)
        c2.weight.copy_(last.weight[:, :, None, None])
        c2.bias.copy_(last.bias)
    return nn.Sequential(c1, nn.ReLU(), c2)


def region_scores(scores: torch.Tensor, region: int = REGION) -> torch.Tensor:
    """The mean over ``region`` x ``region`` cells around each cell (fewer at the map's edge)."""
    return F.avg_pool2d(scores, region, 1, region // 2, count_include_pad=False)


class PseudoLabels:
    """Self-supervised trunk, negative-reference pseudo-labels, a cell head (see the module's doc)."""

    name = "self-supervised, pseudo-labels"

    def __init__(self, budget, shape, seed: int = 0, steps: int = 3000, ref_cells: int = 30000,
                 region: int = 128, crop: int = 64, max_batch: int = 128, lr: float = 1e-3,
                 temperature: float = 0.2, jitter: float = 0.15):  # fmt: skip
        self.budget, self.seed, self.steps, self.ref_cells = budget, seed, steps, ref_cells
        self.region, self.crop, self.lr, self.temperature, self.jitter = region, crop, lr, temperature, jitter
        self.model = build("topk", seed)
        torch.manual_seed(seed)
        self.projection = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
        self.trunk = Trunk(self.model)
        # a SimCLR step runs the trunk on 2 x batch crops, untiled: the largest batch whose step fits
        pairs, step_memory = choose_batch(self.model.map, crop, budget_bytes(budget), 2 * max_batch)
        self.batch, self.step_memory = max(1, pairs // 2), step_memory
        self.pass_memory = int(bp.make_plan(self.trunk, tuple(shape), memory=budget).memory)
        self.evidence, self.images, self.rng = None, {}, np.random.default_rng(seed)
        trained = [*self.model.map.trunk.parameters(), *self.projection.parameters()]
        self.optimizer = torch.optim.Adam(trained, lr)

    @property
    def memory(self) -> int:
        """The larger predicted peak: a SimCLR step (untiled) or a tiled pass over a slide."""
        return max(int(self.step_memory), self.pass_memory)

    # -- 1. the pretext ---------------------------------------------------------------------------

    def regions(self, slides, n: int) -> torch.Tensor:
        """``n`` random tissue regions (n, 3, r, r) uint8 of ``slides`` (each read once, kept)."""
        for s in slides:
            if s.path not in self.images:
                image = np.asarray(bp.io.open_slide(s.path)[0])
                self.images[s.path] = (image, tissue_corners(s, self.region) or [(0, 0)])
        r, out = self.region, []
        for i in self.rng.integers(len(slides), size=n):
            image, corners = self.images[slides[i].path]
            y, x = corners[self.rng.integers(len(corners))]
            out.append(image[:, y : y + r, x : x + r])
        return torch.from_numpy(np.stack(out))

    def simclr_step(self, regions: torch.Tensor) -> float:
        views = [jittered_view(regions, self.crop, self.jitter, self.rng) for _ in range(2)]
        h1, h2 = (self.model.map.trunk(normalise(v)).mean((2, 3)) for v in views)
        loss = nt_xent(self.projection(h1), self.projection(h2), self.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def pretrain(self, slides) -> None:
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            nn.Module.train(m, True)  # train-mode BatchNorm for the pretext (the crops are small)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, max(1, self.steps))
        for _ in tqdm(range(self.steps), desc="SimCLR", leave=False):
            self.simclr_step(self.regions(slides, self.batch))
            schedule.step()
        for m in norms:
            nn.Module.train(m, False)
        self.images.clear()
        calibrate_batchnorm(self.model, tissue_patches(slides))

    # -- 2-4. features, pseudo-labels, head -------------------------------------------------------

    def cells(self, slide) -> torch.Tensor:
        """The trunk's features of the slide's inner cells (n, 64), one tiled pass."""
        with torch.no_grad():
            f = inner(bp.tiled(self.trunk, memory=self.budget)(bp.io.open_slide(slide.path)))
        return f[0].flatten(1).T

    def pseudo_labelled(self, slides) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Standardised cells and their pseudo-labels: the ``FRACTION`` most unusual cells of each
        positive slide (1), every cell of the negative slides (0); and the negatives' mean and std."""
        feats = {s.path: self.cells(s) for s in slides}
        negatives = torch.cat([feats[s.path] for s in slides if not s.label])
        mean, std = negatives.mean(0), negatives.std(0) + 1e-6
        g = torch.Generator().manual_seed(self.seed)
        ref = ((negatives - mean) / std)[torch.randperm(len(negatives), generator=g)[: self.ref_cells]]
        chosen = []
        for s in (s for s in slides if s.label):
            z = (feats[s.path] - mean) / std
            chosen.append(z[nearest_distance(z, ref).topk(max(1, int(FRACTION * len(z)))).indices])
        x = torch.cat([*chosen, (negatives - mean) / std])
        y = torch.cat([torch.ones(sum(map(len, chosen))), torch.zeros(len(negatives))])
        return x, y, mean, std

    def fit(self, slides, epochs: int = 1, seed: int = 0) -> list[float]:
        """The whole method once (``epochs`` is not used: the pretext's length is ``steps``); its
        seconds as one epoch."""
        t0 = time.perf_counter()
        self.model.train()
        self.pretrain(slides)
        self.model.eval()
        x, y, mean, std = self.pseudo_labelled(slides)
        head = fit_head(x, y, self.seed)
        self.evidence = nn.Sequential(self.trunk, as_convolutions(head, mean, std)).eval()
        return [time.perf_counter() - t0]

    def step_once(self, slide, rng=None) -> float:
        """For the memory measurement: one SimCLR step on regions of ``slide`` and one tiled pass."""
        loss = self.simclr_step(self.regions([slide], self.batch))
        self.cells(slide)
        return loss

    # -- 5. the slide score -----------------------------------------------------------------------

    def readout(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slide score and heatmap from the score map: the region means of the inner map, the mean
        of their ``TOP`` highest; the heatmap their sigmoid, 0 on the margin."""
        regions = region_scores(inner(scores))
        return regions.flatten(1).topk(TOP, dim=-1).values.mean(-1), outer(torch.sigmoid(regions)[0, 0])

    def predict(self, slide) -> dict:
        with torch.no_grad():
            scores = bp.tiled(self.evidence, memory=self.budget)(bp.io.open_slide(slide.path))
            score, heat = self.readout(scores)
        return {"score": score.item(), "heat": heat.numpy(), "stride": STRIDE}
