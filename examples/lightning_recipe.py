"""Training a tiled model with Lightning: the LightningModule's model is ``bp.tiled(...)``.

Nothing else changes: Lightning's loop, optimisers, gradient accumulation, DDP and checkpoints
all see an ordinary ``nn.Module`` whose parameters are the model's own. Each input is one whole
image (here synthetic noise standing in for slides), run tile by tile with the untiled model's
loss and gradients.

    python examples/lightning_recipe.py                                   # one step, one process
    python examples/lightning_recipe.py --devices 2 --strategy ddp        # two CPU processes on gloo
    python examples/lightning_recipe.py --accumulate 2 --steps 1 --checkpoint last.ckpt

Lightning is an optional extra (``pip install lightning``); bigpicture does not need it.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import bigpicture as bp


def classifier() -> nn.Module:
    """A small whole-image classifier: convolutions, then a global mean streamed over the tiles."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2),
    )  # fmt: skip


class SyntheticSlides(Dataset):
    """Seeded random images with a label each: synthetic stand-ins, the same on every process."""

    def __init__(self, count: int = 4, side: int = 96, dtype: torch.dtype = torch.float64) -> None:
        self.count, self.side, self.dtype = count, side, dtype

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        image = torch.randn(3, self.side, self.side, generator=g, dtype=self.dtype)
        return image, torch.tensor(i % 2)


class TiledClassifier(L.LightningModule):
    """A LightningModule whose network is tiled: ``self.net = bp.tiled(model, tile=...)``."""

    def __init__(self, tile: int = 32, lr: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = bp.tiled(classifier().double(), tile=tile)  # float64: exactness shows bit for bit

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss.detach(), batch_size=len(x))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def trainer(
    devices: int = 1, strategy: str = "auto", steps: int = 1, accumulate: int = 1, **kwargs
) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps,
        accumulate_grad_batches=accumulate, limit_train_batches=steps * accumulate, max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        **kwargs,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--strategy", default="auto", help="e.g. ddp: one process per device (gloo on CPU)")
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps")
    ap.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step")
    ap.add_argument(
        "--fast-dev-run", type=int, default=0, help="Lightning's quick check: N batches, no saving"
    )
    ap.add_argument("--checkpoint", help="save the trained module here (a .ckpt file)")
    a = ap.parse_args()
    module = TiledClassifier()
    data = DataLoader(SyntheticSlides(count=a.devices * a.steps * a.accumulate), batch_size=1)
    extra = {"fast_dev_run": a.fast_dev_run} if a.fast_dev_run else {}
    t = trainer(a.devices, a.strategy, a.steps, a.accumulate, **extra)
    t.fit(module, data)
    if a.checkpoint and not a.fast_dev_run:
        t.save_checkpoint(a.checkpoint)  # rank 0 writes it
    if t.is_global_zero:
        print(module.net.plan)


if __name__ == "__main__":
    main()
