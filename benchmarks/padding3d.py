"""3D convolutions at the image border on a CPU: padded natively (the convolution's own
``padding=``, as on a GPU) against reading a padded copy (the engine's CPU rule,
``engine/rules/window.Conv.pads_natively``): time side by side in one process, peak memory in fresh
processes.

The engine asks ``pads_natively`` at every call, so one tiled network runs both ways in one
process: the two alternate step by step (native, copy, native, copy, ...) for ``--repeats`` steps
each after a warm-up of both; the fastest step counts per way (other jobs only add time). Peak
memory: one fresh process per way, started with MALLOC_MMAP_THRESHOLD_=65536 (freed tensors leave
the RSS at once), the peak RSS above the RSS before one step (``perfmodel.py``'s measure).

    python benchmarks/padding3d.py --write        # ~4 min
    python benchmarks/padding3d.py --quick        # small volumes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from results import publish

HERE = Path(__file__).resolve().parent
SECTION = "## Engine: 3D convolutions padded natively or by a copy on a CPU (benchmarks/padding3d.py)"
CONFIGS = [  # network, tile, mode: perfmodel.py's 3D UNet (8-16-32 channels) and a wider one
    ("unet3d", 32, "inference"),
    ("unet3d", 32, "training"),
    ("unet3d", 48, "inference"),
    ("unet3d", 48, "training"),
    ("unet3d_wide", 48, "inference"),
    ("unet3d_wide", 48, "training"),
]
WAYS = ("native", "copy")


def network(name: str):
    import torch
    from monai.networks import nets
    from perfmodel import network as perfmodel_network

    if name == "unet3d_wide":  # 32-64-128 channels: oneDNN runs most of its convolutions, not im2col
        torch.manual_seed(0)
        return nets.UNet(3, 1, 2, channels=(32, 64, 128), strides=(2, 2), num_res_units=1, norm="batch")
    return perfmodel_network(name)


def way(name: str) -> None:
    """Every convolution decides as a GPU does ("native") or as the engine does here ("copy")."""
    from bigpicture.engine.rules import window

    if not hasattr(window.Conv, "_engine_rule"):
        window.Conv._engine_rule = window.Conv.pads_natively
    rule = window.Conv._engine_rule
    window.Conv.pads_natively = (lambda self, cpu: rule(self, False)) if name == "native" else rule


def setup(cfg: dict):
    import torch

    import bigpicture as bp

    torch.set_num_threads(cfg["threads"])
    model = network(cfg["net"])
    model = bp.freeze_batchnorm(model.train()) if cfg["mode"] == "training" else model.eval()
    net = bp.tiled(model, tile=cfg["tile"])
    x = torch.randn((1, 1) + (cfg["side"],) * 3)

    def step() -> None:
        if cfg["mode"] == "inference":
            with torch.no_grad():
                net(x)
            return
        model.zero_grad(set_to_none=True)
        net(x).sum().backward()

    return model, step


def times(cfg: dict) -> dict:
    """Both ways alternating in this process: the fastest step of each."""
    _, step = setup(cfg)
    best = {}
    for name in WAYS:  # warm-up: plans, and each way's kernels once
        way(name)
        step()
    for _ in range(cfg["repeats"]):
        for name in WAYS:
            way(name)
            start = time.perf_counter()
            step()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best


def memory(cfg: dict) -> dict:
    """In a fresh process: the peak RSS of one step of ``cfg["way"]`` above the RSS before it."""
    from perfmodel import step_peak

    way(cfg["way"])
    model, step = setup(cfg)
    step()  # warm-up: plans
    return {"memory": step_peak(model, step)}


def child(cfg: dict, **env) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), **env}
    p = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True,
                       text=True, env=env, cwd=HERE, timeout=1800)  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"{cfg}: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [
        "| network | volume | tile | mode | native s | copy s | native / copy | native MiB | copy MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, m = r["time"], r["memory"]
        lines.append(
            f"| {r['net']} | {r['side']}^3 | {r['tile']} | {r['mode']} | {t['native']:.3f} | "
            f"{t['copy']:.3f} | {t['native'] / t['copy']:.2f} | {m['native'] / 2**20:.1f} | "
            f"{m['copy'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="small volumes and tiles, 2 repeats")
    ap.add_argument("--write", action="store_true", help="write the table into RESULTS.md")
    a = ap.parse_args()
    if a.one:
        cfg = json.loads(a.one)
        print(json.dumps(memory(cfg) if "way" in cfg else times(cfg)))
        return
    start, load = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for net, tile, mode in CONFIGS:
        cfg = {"net": net, "tile": tile // (4 if a.quick else 1), "mode": mode, "threads": a.threads,
               "repeats": 2 if a.quick else a.repeats, "side": 24 if a.quick else 96}  # fmt: skip
        row = {**cfg, "time": child(cfg), "memory": {}}
        for name in WAYS:
            row["memory"][name] = child({**cfg, "way": name}, MALLOC_MMAP_THRESHOLD_="65536")["memory"]
        rows.append(row)
        t = row["time"]
        print(f"[{time.perf_counter() - start:5.0f} s] {net} {tile} {mode}: native {t['native']:.3f} s, "
              f"copy {t['copy']:.3f} s", flush=True)  # fmt: skip
    from perfmodel import machine

    body = [
        f"{machine()}; load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
        f"{time.perf_counter() - start:.0f} s. Time: the fastest of {rows[0]['repeats']} steps per way, the "
        "ways alternating step by step in one process; memory: one fresh process per way, the peak RSS "
        "of one step above the RSS before it.",
        "",
        table(rows),
    ]
    publish("padding3d.py", SECTION, body, a.write and not a.quick)


if __name__ == "__main__":
    main()
