"""The compared methods, all at one memory budget, all trained from slide labels only.

- ``WholeSlide``: the whole slide at full resolution, one input, ``bp.tiled(model, memory=budget)``:
  the planner picks the tile whose predicted peak fits the budget; pooled by top-k (with every
  position of a negative slide taught "lesion-free"), by log-sum-exp (a smooth maximum), by the
  mean, or by attention-MIL over every position (streamed softmax).
- ``Downsampled`` (baseline a): the same network, untiled, on a pyramid level of the slide: the
  finest level whose predicted untiled training step fits the budget.
- ``Patches`` (baseline b): the same trunk on P x P tissue patches, each labelled with its
  slide's label, batches as large as the budget allows; a slide's score is the mean or the max
  of its patch probabilities.
- ``PatchMIL`` (baseline c): gated attention-MIL over the patch features of (b)'s trained trunk.

Each method's ``memory`` is its planner-predicted peak of one training step (for untiled runs:
the plan of one tile covering the whole input); ``step_once`` runs one training step, for the
fresh-process measurement of peak RSS.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm
from wsi_dataset import Turned, tissue_of
from wsi_models import STRIDE, AttentionMIL, build, calibrate_batchnorm, loss_of

import bigpicture as bp


def untiled_memory(model, shape) -> int:
    """Predicted peak bytes of one untiled training step on ``shape``: the plan of one tile
    covering the whole input (``bp.make_plan`` with the tile as large as the image)."""
    return int(bp.make_plan(model, tuple(shape), tile=max(shape[2:]), training=True).memory)


def budget_bytes(budget: str | int) -> int:
    units = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    if isinstance(budget, int):
        return budget
    return int(float(budget[:-3]) * units[budget[-3:]])


def read_all(source) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(source[:, :, :, :]))


def tissue_corners(slide, patch: int) -> list[tuple[int, int]]:
    """Top-left corners of the ``patch`` px patches with at least half tissue (found on level 1)."""
    rgb = np.moveaxis(np.asarray(bp.io.open_slide(slide.path, level=1)[0]), 0, -1)
    p, (h, w) = patch // 2, rgb.shape[:2]
    return [(2 * y, 2 * x) for y in range(0, h - p + 1, p) for x in range(0, w - p + 1, p)
            if tissue_of(rgb[y : y + p, x : x + p]).mean() >= 0.5]  # fmt: skip


def tissue_patches(slides, patch: int = 128, per_slide: int = 8):
    """Tissue patches of the first slides (for BatchNorm statistics): batches of (k, 3, p, p); none
    from a slide without a patch of half tissue (then the statistics stay the initial ones)."""
    for s in slides[:4]:
        corners = tissue_corners(s, patch)
        corners = corners[:: max(1, len(corners) // per_slide)][:per_slide]
        source = bp.io.open_slide(s.path)
        if corners:
            yield torch.from_numpy(np.stack([source[0, :, y : y + patch, x : x + patch] for y, x in corners]))


def balanced_order(slides, rng: np.random.Generator) -> list:
    """The slides in a random order that alternates positive and negative (class-balanced steps: the
    optimiser never sees a run of one class); the larger class's remainder at the end."""
    groups = [[s for s in slides if s.label == c] for c in (1, 0)]
    groups = [[g[i] for i in rng.permutation(len(g))] for g in groups]
    first = int(rng.integers(2))
    a, b = groups[first], groups[1 - first]
    return [s for pair in zip(a, b) for s in pair] + a[len(b) :] + b[len(a) :]


def paired_order(slides, rng: np.random.Generator) -> list[tuple]:
    """(positive, negative) pairs of slides of the same host, in a random order (each slide once; a
    host's unpaired remainder is left out of that epoch). One optimiser step per pair: the host
    tissue, alike in both, pushes the pair's gradients in opposite directions and largely cancels,
    so what is left is the lesion's (slide labels only still)."""
    pairs = []
    for host in sorted({s.host for s in slides}):
        groups = [[s for s in slides if s.host == host and s.label == c] for c in (1, 0)]
        groups = [[g[i] for i in rng.permutation(len(g))] for g in groups]
        pairs += list(zip(*groups))
    return [pairs[i] for i in rng.permutation(len(pairs))]


def cosine_schedule(optimizer, steps: int):
    """The learning rate decays from its start to 0 over ``steps`` along a half cosine."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))


def epochs_of(fit_one, slides, epochs: int, seed: int, desc: str, order=balanced_order) -> list[float]:
    """Run ``fit_one(item, rng)`` over the items of ``order(slides, rng)`` (slides in a class-balanced
    order, or pairs of slides), a fresh order per epoch (``rng`` also draws the augmentation);
    seconds per epoch."""
    rng, seconds = np.random.default_rng(seed), []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for item in tqdm(order(slides, rng), desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False):
            fit_one(item, rng)
        seconds.append(time.perf_counter() - t0)
    return seconds


def turn(x: torch.Tensor, rng: np.random.Generator | None) -> torch.Tensor:
    """An in-memory (N, C, H, W) batch turned by a random multiple of 90 degrees and maybe mirrored
    (``rng`` None: unchanged): the augmentation of the untiled methods, as ``Turned`` is the tiled one's."""
    if rng is None:
        return x
    x = torch.rot90(x, int(rng.integers(4)), (2, 3))
    return x.flip(-1) if rng.random() < 0.5 else x


class WholeSlide:
    NAMES = {
        "lse": "whole slide, tiled, LSE",
        "mean": "whole slide, tiled, mean",
        "topk": "whole slide, tiled, top-k",
        "attention": "whole slide, tiled, attention-MIL",
    }

    def __init__(self, budget, shape, pool: str = "lse", seed: int = 0, lr: float = 1e-3,
                 paired: bool = True):  # fmt: skip
        self.name, self.budget, self.model = self.NAMES[pool], budget, build(pool, seed)
        self.paired = paired
        self.net = bp.tiled(self.model, memory=budget)
        self.plan = bp.make_plan(self.model, tuple(shape), memory=budget, training=True)  # the net's, ahead
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.schedule = None

    def step_once(self, slide, rng: np.random.Generator | None = None) -> float:
        """One training step on the whole slide, read tile by tile (a random ``Turned`` view of it
        when ``rng`` is given); ``slide`` may be a pair of slides: their gradients summed, one step."""
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for s in slide if isinstance(slide, tuple) else (slide,):
            source = bp.io.open_slide(s.path)
            loss = loss_of(self.net(source if rng is None else Turned.random(source, rng)), s.label)
            loss.backward()
            total += loss.item()
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        return total

    def fit(self, slides, epochs: int, seed: int = 0) -> list[float]:
        calibrate_batchnorm(self.model, tissue_patches(slides))
        order = paired_order if self.paired else balanced_order
        steps = len(order(slides, np.random.default_rng(seed)))
        self.schedule = cosine_schedule(self.optimizer, epochs * steps)
        return epochs_of(self.step_once, slides, epochs, seed, self.name, order)

    @property
    def memory(self) -> int:
        return int(self.plan.memory)

    def predict(self, slide) -> dict:
        """Slide logit and heatmap (one value per 16 px) from one tiled inference pass."""
        self.model.eval()
        with torch.no_grad():
            maps = bp.tiled(self.model.evidence, memory=self.budget)(bp.io.open_slide(slide.path))
            logit, heat = self.model.readout(maps)
        self.model.train()
        return {"score": logit.item(), "heat": heat.numpy(), "stride": STRIDE}


class Downsampled:
    name = "downsampled, untiled"

    def __init__(self, budget, shape, pool: str = "topk", seed: int = 0, lr: float = 1e-3, levels: int = 8):
        self.model = build(pool, seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.level, self.memory = choose_level(self.model, shape, budget_bytes(budget), levels)
        self.factor, self.schedule = 2**self.level, None

    def image(self, slide) -> torch.Tensor:
        """The slide at 1/``factor``: its pyramid level, or the coarsest one averaged further."""
        stored = min(self.level, bp.io.open_slide(slide.path).level_count - 1)
        x = read_all(bp.io.open_slide(slide.path, level=stored))
        f = 2 ** (self.level - stored)
        return x if f == 1 else torch.nn.functional.avg_pool2d(x.float(), f, ceil_mode=True)

    def step_once(self, slide, rng: np.random.Generator | None = None) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_of(self.model(turn(self.image(slide), rng)), slide.label)
        loss.backward()
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        return loss.item()

    def fit(self, slides, epochs: int, seed: int = 0) -> list[float]:
        calibrate_batchnorm(self.model, (self.image(s) for s in slides[:4]))
        self.schedule = cosine_schedule(self.optimizer, epochs * len(slides))
        return epochs_of(self.step_once, slides, epochs, seed, self.name)

    def predict(self, slide) -> dict:
        self.model.eval()
        with torch.no_grad():
            scores = self.model.map(self.image(slide))
            logit = self.model.readout(scores)[0]
        self.model.train()
        heat = torch.sigmoid(scores)[0, 0].numpy()
        return {"score": logit.item(), "heat": heat, "stride": STRIDE * self.factor}


def choose_level(model, shape, budget: int, levels: int) -> tuple[int, int]:
    """The finest pyramid level (each halves the side) whose untiled step is predicted to fit."""
    n, c, h, w = shape
    for level in range(levels):
        f = 2**level
        memory = untiled_memory(model, (n, c, -(-h // f), -(-w // f)))
        if memory <= budget:
            return level, memory
    raise ValueError(f"no level up to 1/{2 ** (levels - 1)} fits {budget} bytes untiled")


class Patches:
    name = "patches"

    def __init__(self, budget, patch: int = 128, seed: int = 0, lr: float = 1e-3, max_batch: int = 256):
        self.patch, self.model = patch, build("mean", seed, margin=0)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.batch, self.memory = choose_batch(self.model, patch, budget_bytes(budget), max_batch)
        self.sources, self.schedule = {}, None

    def source(self, path: str):
        if path not in self.sources:
            self.sources[path] = bp.io.open_slide(path)
        return self.sources[path]

    def positions(self, slide) -> list[tuple[int, int]]:
        """Top-left corners of the patches with at least half tissue (found on the image itself)."""
        return tissue_corners(slide, self.patch)

    def read(self, source, corners) -> torch.Tensor:
        p = self.patch
        return torch.from_numpy(np.stack([source[0, :, y : y + p, x : x + p] for y, x in corners]))

    def step_batch(self, items, rng: np.random.Generator | None = None) -> float:
        x = torch.cat([self.read(self.source(path), [(y, x)]) for path, y, x, _ in items])
        labels = torch.tensor([float(label) for *_, label in items])
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(turn(x, rng)).reshape(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        loss.backward()
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        return loss.item()

    def step_once(self, slide) -> float:
        corners = self.positions(slide)[: self.batch]
        return self.step_batch([(slide.path, y, x, slide.label) for y, x in corners])

    def fit(self, slides, epochs: int, seed: int = 0) -> list[float]:
        calibrate_batchnorm(self.model, tissue_patches(slides))
        items = [(s.path, y, x, s.label) for s in slides for y, x in self.positions(s)]
        rng = np.random.default_rng(seed + 1)
        batches = []
        for _ in range(epochs):  # one shuffled list of batches per epoch
            order = [items[j] for j in rng.permutation(len(items))]
            batches.append([order[i : i + self.batch] for i in range(0, len(order), self.batch)])
        self.schedule = cosine_schedule(self.optimizer, sum(len(b) for b in batches))
        seconds = []
        for epoch, epoch_batches in enumerate(batches):
            t0 = time.perf_counter()
            for b in tqdm(epoch_batches, desc=f"{self.name} epoch {epoch + 1}/{epochs}", leave=False):
                self.step_batch(b, rng)
            seconds.append(time.perf_counter() - t0)
        return seconds

    def encode(self, slide) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
        """Patch corners, patch logits (n,) and trunk features (n, d), in batches, inference."""
        corners, source = self.positions(slide), self.source(slide.path)
        logits, features = [], []
        self.model.eval()
        with torch.no_grad():
            for i in range(0, len(corners), self.batch):
                f = self.model.map.features(self.read(source, corners[i : i + self.batch]))
                logits.append(self.model.pool(self.model.map.score(f)).reshape(-1))
                features.append(f.mean(dim=(2, 3)))
        self.model.train()
        return corners, torch.cat(logits), torch.cat(features)

    def grid(self, slide, corners, values) -> np.ndarray:
        """Values per patch on the patch grid of the slide (0 where no patch was taken)."""
        h, w = bp.io.open_slide(slide.path).shape[2:]
        out = np.zeros((-(-h // self.patch), -(-w // self.patch)))
        for (y, x), v in zip(corners, np.asarray(values)):
            out[y // self.patch, x // self.patch] = v
        return out

    def predict(self, slide) -> dict:
        corners, logits, _ = self.encode(slide)
        probs = torch.sigmoid(logits).numpy()
        heat = self.grid(slide, corners, probs)
        return {"score_mean": float(probs.mean()), "score_max": float(probs.max()), "heat": heat,
                "stride": self.patch}  # fmt: skip


def choose_batch(model, patch: int, budget: int, max_batch: int) -> tuple[int, int]:
    """The largest power-of-two batch of patches whose untiled training step is predicted to fit."""
    best = None
    batch = 1
    while batch <= max_batch:
        memory = untiled_memory(model, (batch, 3, patch, patch))
        if memory > budget:
            break
        best, batch = (batch, memory), batch * 2
    if best is None:
        raise ValueError(f"not even one {patch} x {patch} patch fits {budget} bytes")
    return best


class PatchMIL:
    name = "patch features, attention-MIL"

    def __init__(self, patches: Patches, seed: int = 0, lr: float = 1e-3):
        torch.manual_seed(seed)
        self.patches, self.mil = patches, AttentionMIL(patches.model.map.score.in_channels)
        self.optimizer = torch.optim.Adam(self.mil.parameters(), lr=lr)
        self.bags = {}
        self.memory = patches.memory  # feature extraction at (b)'s batch dominates; the MIL is tiny

    def bag(self, slide):
        if slide.path not in self.bags:
            self.bags[slide.path] = self.patches.encode(slide)
        return self.bags[slide.path]

    def step_once(self, slide, rng=None) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_of(self.mil(self.bag(slide)[2]), slide.label)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def fit(self, slides, epochs: int, seed: int = 0) -> list[float]:
        t0 = time.perf_counter()
        for s in tqdm(slides, desc="patch features", leave=False):
            self.bag(s)
        encode = time.perf_counter() - t0
        seconds = epochs_of(self.step_once, slides, epochs, seed, self.name)
        return [encode / epochs + s for s in seconds]  # feature extraction spread over the epochs

    def predict(self, slide) -> dict:
        corners, _, features = self.bag(slide)
        with torch.no_grad():
            logit, weights = self.mil(features), self.mil.weights(features)
        heat = self.patches.grid(slide, corners, (weights / weights.max()).numpy())
        return {"score": logit.item(), "heat": heat, "stride": self.patches.patch}
