"""A diagnostic upper bound, not a contender: the same network trained on the lesion MASKS.

Every other method sees slide labels only. This one is told, for every 16 x 16 px cell of a
training crop, whether it is lesion (dense supervision, the masks that are otherwise kept for
evaluation only). If even it cannot find the lesions of held-out slides, no slide-label method
can: the lesion is then not learnably visible to this trunk from this many examples, and a
chance-level result of the others says nothing about their pooling. Its slide score is the
log-sum-exp of its score map (as the whole-slide method's), its prediction tile by tile.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from wsi_methods import WholeSlide, budget_bytes, choose_batch, tissue_patches
from wsi_metrics import cells
from wsi_models import STRIDE, calibrate_batchnorm

import bigpicture as bp


class LesionSupervised(WholeSlide):
    """Crops of ``crop`` px (half of them around a lesion, half anywhere), each cell's target
    whether it is lesion; batches as large as the budget allows (at most ``max_batch``)."""

    def __init__(self, budget, shape, crop: int = 256, seed: int = 0, lr: float = 1e-3, max_batch: int = 8):
        super().__init__(budget, shape, "lse", seed, lr)
        self.name = "oracle: trained on lesion masks"
        self.crop, self.rng, self.masks = crop, np.random.default_rng(seed + 2), {}
        self.batch, self.plan_memory = choose_batch(self.model, crop, budget_bytes(budget), max_batch)

    @property
    def memory(self) -> int:
        return int(self.plan_memory)

    def lesion(self, slide) -> np.ndarray:
        if slide.path not in self.masks:
            self.masks[slide.path] = slide.load_masks()[1]
        return self.masks[slide.path]

    def corner(self, slide) -> tuple[int, int, int]:
        """A crop's top-left corner (on the 16 px grid) and side: for half the crops of a positive
        slide, around a lesion pixel (which lies inside the crop); else anywhere."""
        lesion, (h, w) = self.lesion(slide), self.lesion(slide).shape
        c = min(self.crop, h, w) // STRIDE * STRIDE
        if slide.label and self.rng.random() < 0.5:
            y, x = np.argwhere(lesion)[self.rng.integers(lesion.sum())]
            y, x = y - self.rng.integers(STRIDE, c - STRIDE), x - self.rng.integers(STRIDE, c - STRIDE)
        else:
            y, x = self.rng.integers(0, h - c + 1), self.rng.integers(0, w - c + 1)
        y, x = (int(np.clip(v, 0, n - c)) // STRIDE * STRIDE for v, n in ((y, h), (x, w)))
        return y, x, c

    def sample(self, slide) -> tuple[torch.Tensor, torch.Tensor]:
        """One crop (1, 3, c, c) of ``slide`` and its lesion target per cell (1, c/16, c/16)."""
        (y, x, c), lesion = self.corner(slide), self.lesion(slide)
        image = torch.from_numpy(np.asarray(bp.io.open_slide(slide.path)[:, :, y : y + c, x : x + c]))
        target = torch.from_numpy(cells(lesion[y : y + c, x : x + c], STRIDE) >= 0.5).float()[None]
        turns, mirror = int(self.rng.integers(4)), bool(self.rng.random() < 0.5)  # crop and target alike
        image, target = torch.rot90(image, turns, (2, 3)), torch.rot90(target, turns, (1, 2))
        return (image.flip(-1), target.flip(-1)) if mirror else (image, target)

    def step_once(self, slide, others=None) -> float:
        """One batch: crops of ``slide`` and of ``others`` (random training slides)."""
        pool = [slide] + list(others or [])
        pairs = [self.sample(pool[i % len(pool)]) for i in range(self.batch)]
        x, target = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        self.optimizer.zero_grad(set_to_none=True)
        scores = self.model.map(x)[:, 0]
        loss = F.binary_cross_entropy_with_logits(scores, target, pos_weight=torch.tensor(10.0))
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def fit(self, slides, epochs: int, seed: int = 0) -> list[float]:
        """As many batches per epoch as there are training slides (the whole-slide methods' steps)."""
        calibrate_batchnorm(self.model, tissue_patches(slides))
        rng, seconds = np.random.default_rng(seed), []
        for epoch in range(epochs):
            t0 = time.perf_counter()
            order = rng.permutation(len(slides))
            for i in tqdm(order, desc=f"oracle epoch {epoch + 1}/{epochs}", leave=False):
                self.step_once(slides[i], [slides[j] for j in rng.integers(0, len(slides), self.batch - 1)])
            seconds.append(time.perf_counter() - t0)
        return seconds
