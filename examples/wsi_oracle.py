"""A diagnostic upper bound, not a contender: the same network trained on the lesion MASKS.

Every other method sees slide labels only. This one is told, for every 16 x 16 px cell of a
training crop, whether it is lesion (dense supervision, the masks that are otherwise kept for
evaluation only). If even it cannot find the lesions of held-out slides, no slide-label method
can: the lesion is then not learnably visible to this trunk from this many examples, and a
chance-level result of the others says nothing about their pooling. Its slide score is the
mean of the top-k of its score map (as the whole-slide top-k method's), its prediction tile by tile.

``texture_separability`` is the data check that comes before everything: the same trunk as a
patch classifier, lesion against host patches chosen by the masks. It says whether the lesion's
texture is visible at all at this scale, and how well (a slide is found by its highest-scoring
place, so the lesion must outscore hundreds of host places: a patch AUROC of 0.8 is not enough).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from wsi_methods import WholeSlide, budget_bytes, choose_batch, tissue_patches, turn
from wsi_metrics import auc, cells
from wsi_models import STRIDE, build, calibrate_batchnorm

import bigpicture as bp


class LesionSupervised(WholeSlide):
    """Crops of ``crop`` px (half of them around a lesion, half anywhere), each cell's target
    whether it is lesion; batches as large as the budget allows (at most ``max_batch``)."""

    def __init__(self, budget, shape, crop: int = 256, seed: int = 0, lr: float = 1e-3, max_batch: int = 8):
        super().__init__(budget, shape, "topk", seed, lr)
        self.name = "oracle: trained on lesion masks"
        self.crop, self.rng, self.masks = crop, np.random.default_rng(seed + 2), {}
        # the step trains the score map on crops (no pooling): its untiled step is what must fit
        self.batch, self.plan_memory = choose_batch(self.model.map, crop, budget_bytes(budget), max_batch)

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


# -- is the lesion's texture learnable at all? ----------------------------------------------------


def patches_of(image, tissue, lesion, of_lesion: bool, n: int, patch: int, rng) -> list[np.ndarray]:
    """Up to ``n`` patches (3, p, p) of ``image`` around random lesion pixels (``of_lesion``: patches
    at least 60% lesion) or host pixels (patches at least half tissue, no lesion pixel), 50 tries each."""
    ys, xs = np.nonzero(lesion if of_lesion else tissue & ~lesion)
    (h, w), out = tissue.shape, []
    for _ in range(n if len(ys) else 0):
        for _ in range(50):
            i = rng.integers(len(ys))
            y, x = min(max(ys[i] - patch // 2, 0), h - patch), min(max(xs[i] - patch // 2, 0), w - patch)
            box = (slice(y, y + patch), slice(x, x + patch))
            host = tissue[box].mean() > 0.5 and not lesion[box].any()
            if (lesion[box].mean() > 0.6) if of_lesion else host:
                out.append(image[:, box[0], box[1]])
                break
    return out


def lesion_and_host_patches(slides, patch: int, rng, lesion_per_slide: int = 20, host_per_slide: int = 40):
    """Patches (n, 3, p, p) uint8 and their labels (n,): 1 for lesion patches (positive slides), 0 for
    host patches (every slide)."""
    images, labels = [], []
    for s in slides:
        image, (tissue, lesion) = np.asarray(bp.io.open_slide(s.path)[0]), s.load_masks()
        les = patches_of(image, tissue, lesion, True, lesion_per_slide, patch, rng)
        host = patches_of(image, tissue, lesion, False, host_per_slide, patch, rng)
        images += les + host
        labels += [1.0] * len(les) + [0.0] * len(host)
    shape = (0, 3, patch, patch)
    return torch.from_numpy(np.stack(images) if images else np.zeros(shape, np.uint8)), torch.tensor(labels)


def texture_separability(train, test, patch: int = 32, steps: int = 300, seed: int = 0) -> dict:
    """The data check before any slide-label method: the same trunk trained as a patch classifier,
    lesion against host patches of the training slides (the masks tell which), class-balanced
    batches of 16 turned at random, Adam; its held-out patch AUROC on the held-out slides' patches.
    Near 0.5, the lesion's texture is not visible to this trunk at this scale and no method can find it."""
    rng = np.random.default_rng(seed)
    (x, y), (xt, yt) = (lesion_and_host_patches(s, patch, rng) for s in (train, test))
    counts = {"train": (int(y.sum()), int((1 - y).sum())), "test": (int(yt.sum()), int((1 - yt).sum())),
              "patch": patch, "steps": steps}  # fmt: skip
    if 0 in counts["train"] + counts["test"]:  # lesions too small for a patch of this size
        return {"auroc": float("nan"), **counts}
    model = build("mean", seed, margin=0)
    calibrate_batchnorm(model, [x[i : i + 32] for i in range(0, min(len(x), 128), 32)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pos, neg = (y == 1).nonzero().ravel(), (y == 0).nonzero().ravel()
    for _ in tqdm(range(steps), desc="texture check", leave=False):
        pick = torch.cat([pos[torch.randint(len(pos), (8,))], neg[torch.randint(len(neg), (8,))]])
        loss = F.binary_cross_entropy_with_logits(model(turn(x[pick], rng)).reshape(-1), y[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(xt[i : i + 64]).reshape(-1) for i in range(0, len(xt), 64)])
    return {"auroc": auc(scores.numpy(), yt.numpy()), **counts}
