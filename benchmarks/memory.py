"""Peak memory and time of a ResNet-style classifier, untiled and tiled with bigpicture.

Every configuration (mode x tiled/untiled x image size x tile) runs in a fresh process, which reports
its peak RSS above a baseline taken after imports, model creation and a warm-up step on a small image.

    python benchmarks/memory.py --quick                 # 1-minute smoke run
    python benchmarks/memory.py                         # sizes 2048 4096 8192, tiles 512 1024 2048
    python benchmarks/memory.py --big --write           # + the size untiled training cannot run; RESULTS.md

On a shared, oversubscribed machine use --threads 1: spin-waiting OpenMP threads then slow the tiled
engine (many small ops) far more than the untiled model, and the ratios measure the other users.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from results import publish

GiB, MiB = 2**30, 2**20
SECTION = "## Engine: memory and time (benchmarks/memory.py)"


# -- the model and the input ---------------------------------------------------------------------


def resnet(widths=(16, 32, 64, 128), blocks=2, classes=10):
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu(y + (x if self.down is None else self.down(x)))

    layers = [nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]  # fmt: skip
    cin = widths[0]
    for i, w in enumerate(widths):
        for b in range(blocks):
            layers.append(Block(cin, w, 2 if (i > 0 and b == 0) else 1))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class Synthetic:
    """A lazy (1, 3, n, n) float32 image: deterministic pixels made for the region asked, never stored."""

    def __init__(self, n: int):
        self.shape, self.dtype = (1, 3, n, n), np.dtype(np.float32)

    def __getitem__(self, key):
        _, _, ys, xs = key
        y = np.arange(*ys.indices(self.shape[2]), dtype=np.float32)[:, None]
        x = np.arange(*xs.indices(self.shape[3]), dtype=np.float32)[None, :]
        c = np.arange(3, dtype=np.float32)[key[1]][:, None, None]
        return (np.sin(0.013 * y + c) * np.cos(0.011 * x - c) + 0.1 * np.sin(0.7 * x * y + c))[None]

    def materialise(self):
        import torch

        out = torch.empty(self.shape)
        for lo in range(0, self.shape[2], 1024):  # in row blocks, to keep temporaries small
            hi = min(lo + 1024, self.shape[2])
            out[:, :, lo:hi] = torch.from_numpy(self[:, :, lo:hi, :])
        return out


# -- one configuration, in its own process -------------------------------------------------------


def proc(path: str, key: str) -> int:
    """A ``key: N kB`` entry of a /proc file, in bytes (VmRSS of this process, MemAvailable)."""
    return int(re.search(rf"{key}:\s+(\d+) kB", Path(path).read_text())[1]) * 1024


def one(cfg: dict) -> dict:
    import torch

    import bigpicture as bp

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    model = resnet().eval()
    net = bp.tiled(model, tile=cfg["tile"]) if cfg["tile"] else model

    def step(x):
        if cfg["mode"] == "inference":
            with torch.no_grad():
                return net(x)
        model.zero_grad(set_to_none=True)
        y = net(x)
        y.sum().backward()
        return y.detach()

    step(Synthetic(256).materialise())  # warm-up: lazy init of kernels, threads and the allocator
    base = proc("/proc/self/status", "VmRSS")
    if cfg["cap"]:
        resource.setrlimit(resource.RLIMIT_AS, (cfg["cap"], cfg["cap"]))
    source = Synthetic(cfg["size"])
    x = source if cfg["lazy"] else source.materialise()
    input_bytes = 0 if cfg["lazy"] else x.numel() * x.element_size()
    times, cpu = [], []
    for _ in range(cfg["repeats"]):
        t0, c0 = time.perf_counter(), time.process_time()
        step(x)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the fastest of the repeats: the machine is shared, and interference only ever adds time
    out = {"peak": peak - base, "rss": peak, "input": input_bytes, "times": times}
    out.update(time=min(times), cpu=min(cpu))
    if cfg["tile"]:
        out.update(tiles=len(net.plan.tiles), tile_used=net.plan.tile[0], halo=net.plan.halo[0])
        if cfg["repeats"] == 1:  # then the time includes planning for the new shape: how long is that?
            t0 = time.perf_counter()
            bp.make_plan(model, source.shape, cfg["tile"])  # capture + plan (the step only plans)
            out["plan"] = time.perf_counter() - t0
    return out


def run(cfg: dict, timeout: float) -> dict:
    """Run one configuration in a fresh process; a failure (e.g. out of memory) becomes a row too."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True,
                           text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timed out after {timeout:.0f} s"}
    if p.returncode == 0:
        return {**cfg, **json.loads(p.stdout.strip().splitlines()[-1])}
    lines = [s for s in p.stderr.strip().splitlines() if s.strip()] or [f"exit code {p.returncode}"]
    err = lines[-1][:160]
    if re.search(r"MemoryError|can't allocate|not enough memory|bad_alloc", p.stderr):
        more = re.search(r"allocate (\d+) bytes", p.stderr)
        more = f", allocating {int(more[1]) / MiB:,.0f} MiB more" if more else ""
        err = f"**does not fit**: out of memory under a {cfg['cap'] / GiB:.1f} GiB address-space cap{more}"
    return {**cfg, "error": err, "wall": time.perf_counter() - t0}


# -- the table -----------------------------------------------------------------------------------


def fmt_mib(b):
    return f"{b / MiB:,.0f}"


def table(rows: list[dict]) -> str:
    untiled = {(r["mode"], r["size"]): r for r in rows if not r["tile"] and "error" not in r}
    head = ["mode", "image", "run", "tiles", "input MiB", "peak - base MiB", "peak - base - input MiB",
            "time s", "CPU s", "tiled / untiled time (CPU)", "plan s (in time)"]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        run_ = f"tiled {r['tile']}" + (" (lazy input)" if r["lazy"] else "") if r["tile"] else "untiled"
        cells = [r["mode"], f"{r['size']}²", run_]
        if "error" in r:
            out.append("| " + " | ".join(cells + [r["error"]] + [""] * 7) + " |")
            continue
        ref = untiled.get((r["mode"], r["size"]))
        ratio = f"{r['time'] / ref['time']:.2f} ({r['cpu'] / ref['cpu']:.2f})" if r["tile"] and ref else ""
        tiles, plan = (
            (f"{r['tiles']} (halo {r['halo'][0]}/{r['halo'][1]})", f"{r['plan']:.1f}" if "plan" in r else "")
            if r["tile"]
            else ("", "")
        )
        cells += [tiles, fmt_mib(r["input"]), fmt_mib(r["peak"]), fmt_mib(r["peak"] - r["input"]),
                  f"{r['time']:.2f}", f"{r['cpu']:.2f}", ratio, plan]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def checks(rows: list[dict], a) -> list[str]:
    """The acceptance criteria, read off the rows."""
    ok, out = [r for r in rows if "error" not in r], []
    for mode in a.modes:
        for t in a.tiles:
            flat = [f"{r['size']}²: {fmt_mib(r['peak'] - r['input'])}" for r in ok
                    if r["mode"] == mode and r["tile"] == t and not r["lazy"]]  # fmt: skip
            if len(flat) > 1:
                out.append(f"- {mode}, tile {t}: peak - base - input (MiB) " + ", ".join(flat))
    fits = [r for r in ok if r["mode"] == "training" and not r["tile"]]
    for r in rows:
        if r["cap"] and "error" in r and fits:
            ref = max(fits, key=lambda f: f["size"])
            need = ref["peak"] * (r["size"] / ref["size"]) ** 2
            out.append(
                f"- untiled training at {r['size']}²: fails under a {r['cap'] / GiB:.1f} GiB "
                f"address-space cap; by area from {ref['size']}² it needs ≈ {need / GiB:.0f} GiB"
            )
        if r["lazy"] and "error" not in r:
            out.append(
                f"- tiled {r['mode']} at {r['size']}² (tile {r['tile']}, lazy input): peak RSS "
                f"{r['rss'] / GiB:.2f} GiB in all, {r['peak'] / GiB:.2f} GiB above the baseline"
            )
    ref = {(r["mode"], r["size"]): r for r in ok if not r["tile"]}
    for r in ok:
        if r["tile"] and r["size"] == a.ratio_size and (r["mode"], r["size"]) in ref:
            u, target = ref[(r["mode"], r["size"])], {"inference": 1.15, "training": 1.5}[r["mode"]]
            ratio, verdict = r["time"] / u["time"], "met" if r["time"] / u["time"] <= target else "MISSED"
            out.append(
                f"- {r['mode']} at {r['size']}², tile {r['tile']}: tiled / untiled time {ratio:.2f} "
                f"(CPU {r['cpu'] / u['cpu']:.2f}); target ≤ {target}: {verdict}"
            )
    return out


def timed_step(net, model, x, mode: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one inference or training step of ``net`` (``model``'s gradients zeroed)."""
    import torch

    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "inference":
        with torch.no_grad():
            net(x)
    else:
        model.zero_grad(set_to_none=True)
        net(x).sum().backward()
    return time.perf_counter() - t0, time.process_time() - c0


def machine() -> str:
    def sh(cmd):
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()

    import torch

    cpu = re.search(r"Model name:\s*(.*)", sh("lscpu"))
    mem = sh("free -g | awk '/Mem:/ {print $2}'")
    return (f"{cpu[1] if cpu else platform.processor()}, nproc {sh('nproc')}, {mem} GiB RAM (free -g), "
            f"torch {torch.__version__}, Python {platform.python_version()}, {sh('date')}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192], help="image sides")
    ap.add_argument("--tiles", type=int, nargs="+", default=[512, 1024, 2048], help="tile sides")
    ap.add_argument("--ratio-size", type=int, default=4096, help="where tiled/untiled times are judged")
    ap.add_argument("--max-tiles", type=int, default=64, help="skip tilings with more tiles than this")
    modes = ["inference", "training"]
    ap.add_argument("--modes", nargs="+", default=modes, choices=modes)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per run (fastest kept) up to 4096²")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run")
    ap.add_argument("--big", action="store_true", help="also the size untiled training cannot run")
    ap.add_argument("--big-size", type=int, default=16384)
    ap.add_argument("--big-tile", type=int, default=1024)
    ap.add_argument("--cap", type=float, default=22, help="address-space cap (GiB) for untiled big runs")
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, one repeat")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--write", action="store_true", help="write the table into RESULTS.md")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(json.loads(a.one))))
        return
    if a.quick:
        a.sizes, a.tiles, a.repeats, a.big_size, a.ratio_size = [512, 1024], [512], 1, 2048, 1024
    base = {"threads": a.threads, "lazy": False, "cap": 0}
    cfgs = []
    for mode in a.modes:
        for size in a.sizes:
            reps = a.repeats if size <= 4096 else 1
            for tile in [0] + [t for t in a.tiles if t <= size and (-(-size // t)) ** 2 <= a.max_tiles]:
                cfgs.append({**base, "mode": mode, "size": size, "tile": tile, "repeats": reps})
    if a.big:
        cfgs.append({**base, "mode": "training", "size": a.big_size, "tile": 0, "repeats": 1, "cap": a.cap})
        cfgs.append({**base, "mode": "training", "size": a.big_size, "tile": a.big_tile, "repeats": 1,
                     "lazy": True})  # fmt: skip
    rows, t0, load = [], time.perf_counter(), os.getloadavg()
    for cfg in cfgs:
        if cfg["cap"]:  # below the memory others leave free, so that failing never swaps or OOM-kills
            cfg["cap"] = int(min(cfg["cap"] * GiB, proc("/proc/meminfo", "MemAvailable") - 2 * GiB))
        r = run(cfg, a.timeout)
        rows.append(r)
        print(f"[{time.perf_counter() - t0:6.0f} s] {json.dumps(r)}", flush=True)
    publish("memory.py", SECTION, [
        f"Machine: {machine()}. Load average (1 min) at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f};"
        f" total {time.perf_counter() - t0:.0f} s.", "", table(rows), "", *checks(rows, a), "",
    ], a.write)  # fmt: skip

if __name__ == "__main__":
    main()
