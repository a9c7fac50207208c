"""Untiled eager, tiled eager and tiled compiled (``bp.tiled(model, compile=True)``), side by side.

The engine benchmark's classifier (``memory.resnet()``, eval mode) at 2048² with tiles of 256, 1024
and 2048, inference and training (a forward and backward of ``out.sum()``). After a first step
(capture, planning and, compiled, one ``torch.compile`` per tile geometry: reported apart as the
warm-up) the runs alternate step by step for several rounds; each run's fastest step is kept
(interference only adds time), with its CPU time. The load average during the run is reported: on
a shared machine the wall-clock times are not the machine's speed, the ratios measured side by
side are the result. The section is rewritten after every mode, so a cut-short run keeps what it
measured.

    python benchmarks/compiled.py --write
"""

from __future__ import annotations

import argparse
import os
import time

from memory import Synthetic, machine, resnet, timed_step
from results import publish


def measure(mode: str, size: int, tiles: list[int], rounds: int, threads: int) -> list[dict]:
    import torch

    import bigpicture as bp

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = resnet().eval()
    runs = {("untiled", 0): model}
    for t in tiles:
        runs[("eager", t)] = bp.tiled(model, tile=t)
        runs[("compiled", t)] = bp.tiled(model, tile=t, compile=True)
    x = Synthetic(size).materialise()
    loads, warm = [os.getloadavg()[0]], {}
    for key, net in runs.items():
        warm[key] = timed_step(net, model, x, mode)  # planning and, compiled, the compilations
        loads.append(os.getloadavg()[0])
        print(f"{mode} {size}² {key}: first step {warm[key][0]:.1f} s", flush=True)
    times: dict = {k: [] for k in runs}
    for _ in range(rounds):
        for key, net in runs.items():
            times[key].append(timed_step(net, model, x, mode))
        loads.append(os.getloadavg()[0])
    best = {k: min(w for w, _ in v) for k, v in times.items()}
    cpu = {k: min(c for _, c in v) for k, v in times.items()}
    rows = []
    for (kind, t), net in runs.items():
        compiled = list(getattr(net, "_compiled", {}).values())
        rows.append({
            "mode": mode, "size": size, "kind": kind, "tile": t, "best": best[kind, t], "cpu": cpu[kind, t],
            "ratio": best[kind, t] / best["untiled", 0], "cpu_ratio": cpu[kind, t] / cpu["untiled", 0],
            "warm": warm[kind, t][0], "tiles": len(net.plan.tiles) if t else 0,
            "geometries": sum(c.compilations for c in compiled) if compiled else None,
            "eager": sum(c.eager_calls for c in compiled) if compiled else None,
            "load": max(loads),
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    out = ["| mode | image | run | tiles | first step s (compile) | fastest s | CPU s | / untiled (CPU) | "
           "geometries compiled | max load |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        run = f"{r['kind']} {r['tile']}" if r["tile"] else "untiled eager"
        ratio = f"{r['ratio']:.2f} ({r['cpu_ratio']:.2f})" if r["tile"] else ""
        geo = "" if r["geometries"] is None else f"{r['geometries']}"
        geo += f", {r['eager']} tiles eager" if r["eager"] else ""
        out.append(
            f"| {r['mode']} | {r['size']}² | {run} | {r['tiles'] or ''} | {r['warm']:.1f} | "
            f"{r['best']:.2f} | {r['cpu']:.2f} | {ratio} | {geo} | {r['load']:.1f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048])
    ap.add_argument("--tiles", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--modes", nargs="+", default=["inference", "training"])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (fastest step kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write its section of RESULTS.md")
    a = ap.parse_args()
    t0, rows = time.perf_counter(), []
    for tile in a.tiles:  # one tile at a time, both modes, each beside the untiled model
        for mode in a.modes:
            for size in a.sizes:
                rows += measure(mode, size, [tile], a.rounds, a.threads)
            done = sorted({f"{r['mode']} tile {r['tile']}" for r in rows if r["tile"]})
            title = "## Compiled tiles: untiled, tiled eager, tiled compiled (benchmarks/compiled.py)"
            publish("compiled.py", title, [
                f"Machine: {machine()}. {a.threads} threads; {time.perf_counter() - t0:.0f} s in all; modes "
                f"measured: {', '.join(done)}. First step: capture, planning and, "
                "compiled, torch.compile of every tile geometry (inductor, CPU), apart from the step times. "
                f"Other columns: the fastest of {a.rounds} alternating steps in one process, wall and CPU "
                "seconds; ratios of the fastest steps to the untiled model's. Max load: the 1-minute load "
                "average, highest seen during the run (2 cores): wall-clock times under load are not the "
                "machine's speed.", "", table(rows), "",
            ], a.write)  # fmt: skip


if __name__ == "__main__":
    main()
