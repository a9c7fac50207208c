"""Tiled / untiled time of the engine benchmark's classifier, measured side by side in one process.

`memory.py` runs every configuration in a fresh process, which peak memory needs; but on a virtual
machine whose host takes CPU time away (the ``steal`` column of top), two processes minutes apart
see different machines. Here the untiled model and each tiling alternate step by step in one
process, several rounds, so both see the same machine; the ratio is taken of the fastest steps
(interference only ever adds time), and the CPU stolen by the host during the run is reported.

    python benchmarks/ratios.py --write                  # 4096² and 8192², tiles 1024 and 2048
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from memory import Synthetic, machine, resnet
from results import publish


def steal() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[7], sum(fields[:8])


def measure(mode: str, size: int, tiles: list[int], rounds: int, threads: int) -> list[dict]:
    import torch

    import bigpicture as bp

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = resnet().eval()
    runs = {0: model, **{t: bp.tiled(model, tile=t) for t in tiles}}
    x = Synthetic(size).materialise()

    def step(net):
        t0, c0 = time.perf_counter(), time.process_time()
        if mode == "inference":
            with torch.no_grad():
                net(x)
        else:
            model.zero_grad(set_to_none=True)
            net(x).sum().backward()
        return time.perf_counter() - t0, time.process_time() - c0

    for net in runs.values():
        step(net)  # warm-up and planning
    times: dict = {t: [] for t in runs}
    s0 = steal()
    for _ in range(rounds):
        for t, net in runs.items():
            times[t].append(step(net))
    s1 = steal()
    stolen = (s1[0] - s0[0]) / max(s1[1] - s0[1], 1)
    best = {t: min(w for w, _ in v) for t, v in times.items()}
    best_cpu = {t: min(c for _, c in v) for t, v in times.items()}
    rows = []
    for t in runs:
        rows.append({
            "mode": mode, "size": size, "tile": t, "best": best[t],
            "median": statistics.median(w for w, _ in times[t]), "cpu": best_cpu[t],
            "ratio": best[t] / best[0], "cpu_ratio": best_cpu[t] / best_cpu[0],
            "tiles": len(runs[t].plan.tiles) if t else 0, "steal": stolen,
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    out = ["| mode | image | run | tiles | fastest s | median s | CPU s (fastest) | tiled / untiled (CPU) | "
           "CPU stolen by the host |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        run = f"tiled {r['tile']}" if r["tile"] else "untiled"
        ratio = f"{r['ratio']:.2f} ({r['cpu_ratio']:.2f})" if r["tile"] else ""
        out.append(
            f"| {r['mode']} | {r['size']}² | {run} | {r['tiles'] or ''} | {r['best']:.2f} | "
            f"{r['median']:.2f} | {r['cpu']:.2f} | {ratio} | {100 * r['steal']:.0f}% |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--tiles", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--modes", nargs="+", default=["inference", "training"])
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds (fastest step kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write its section of RESULTS.md")
    a = ap.parse_args()
    t0, rows = time.perf_counter(), []
    for mode in a.modes:
        for size in a.sizes:
            rounds = a.rounds if size <= 4096 else max(2, a.rounds // 2)
            rows += measure(mode, size, a.tiles, rounds, a.threads)
            print(table(rows), flush=True)
    publish("ratios.py", "## Engine: tiled / untiled time side by side (benchmarks/ratios.py)", [
        f"Machine: {machine()}. {a.threads} threads; load average at end {os.getloadavg()[0]:.1f}; "
        f"total {time.perf_counter() - t0:.0f} s. Each row: the fastest of {a.rounds} alternating steps "
        f"({max(2, a.rounds // 2)} above 4096²), in one process; ratios of the fastest steps.", "",
        table(rows), "",
    ], a.write)  # fmt: skip


if __name__ == "__main__":
    main()
