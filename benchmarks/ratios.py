"""Tiled / untiled time of the engine benchmark's classifier, measured side by side in one process.

`memory.py` runs every configuration in a fresh process, which peak memory needs; but on a virtual
machine whose host takes CPU time away (the ``steal`` column of top), two processes minutes apart
see different machines. Here the untiled model and each tiling alternate step by step in one
process, several rounds, so both see the same machine; the ratio is taken of the fastest steps
(interference only ever adds time), and the CPU stolen by the host during the run is reported.

    python benchmarks/ratios.py --write                  # 4096² and 8192², tiles 1024 and 2048
    python benchmarks/ratios.py --sizes 2048 --tiles 256 1024 2048 --cuts --write   # + the planner's cuts
    python benchmarks/ratios.py ... --compile            # + each run with compile=True (compiled tiles)
    python benchmarks/ratios.py --sizes 2048 --tiles 256 --cuts --cuts-only --compile --rounds 3
                                                         # issue 13's acceptance rows only
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from memory import Synthetic, machine, resnet, timed_step
from results import publish, write_section


def steal() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[7], sum(fields[:8])


def variants(tiles: list[int], cuts: bool, compiled: bool, plain: bool = True) -> list[tuple[str, int, dict]]:
    """(label, tile, ``bp.tiled`` keyword arguments) of each tiled run: plain (unless ``plain`` is
    False: ``--cuts-only``); with the planner's cuts (``cuts="auto"``, stages kept in host memory);
    and with ``--compile`` each again with ``compile=True`` (``COMPILE``; the first step, which
    compiles every tile geometry, is excluded by taking the fastest of the rounds)."""
    out = []
    for t in tiles:
        if plain or not cuts:
            out.append((f"tiled {t}", t, {}))
        if cuts:
            out.append((f"tiled {t}, planner's cuts", t, {"cuts": "auto"}))
    if compiled:
        out += [(f"{label}, compiled", t, {**kw, **COMPILE}) for label, t, kw in list(out)]
    return out


COMPILE = {"compile": True}  # bp.tiled(..., compile=True): each tile geometry compiled once


def measure(mode: str, size: int, runs_wanted: list, rounds: int, threads: int) -> list[dict]:
    import torch

    import bigpicture as bp

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = resnet().eval()
    runs = {"untiled": (model, 0)}
    for label, t, kw in runs_wanted:
        try:
            runs[label] = (bp.tiled(model, tile=t, **kw), t)
        except TypeError as e:  # a keyword this branch's bp.tiled does not have yet (compile=)
            print(f"skipped {label}: {e}")
    x = Synthetic(size).materialise()

    def step(net):
        return timed_step(net, model, x, mode)

    for net, _ in runs.values():
        step(net)  # warm-up and planning
    times: dict = {label: [] for label in runs}
    s0 = steal()
    for _ in range(rounds):
        for label, (net, _) in runs.items():
            times[label].append(step(net))
    s1 = steal()
    stolen = (s1[0] - s0[0]) / max(s1[1] - s0[1], 1)
    best = {k: min(w for w, _ in v) for k, v in times.items()}
    best_cpu = {k: min(c for _, c in v) for k, v in times.items()}
    rows = []
    for label, (net, t) in runs.items():
        plan = getattr(net, "plan", None)
        rows.append({
            "mode": mode, "size": size, "run": label, "tile": t, "best": best[label],
            "median": statistics.median(w for w, _ in times[label]), "cpu": best_cpu[label],
            "ratio": best[label] / best["untiled"], "cpu_ratio": best_cpu[label] / best_cpu["untiled"],
            "tiles": sum(len(p.tiles) for p in (*plan.earlier, plan)) if t else 0, "steal": stolen,
            "passes": 1 + len(plan.earlier) if t else 0,
            "predicted": plan.prediction.halo_overhead if t else None,
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    out = ["| mode | image | run | passes | tiles | predicted halo overhead | fastest s | median s | "
           "CPU s (fastest) | tiled / untiled (CPU) | CPU stolen by the host |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ratio = f"{r['ratio']:.2f} ({r['cpu_ratio']:.2f})" if r["tile"] else ""
        halo = f"{100 * r['predicted']:.0f}%" if r["predicted"] is not None else ""
        out.append(
            f"| {r['mode']} | {r['size']}² | {r['run']} | {r['passes'] or ''} | {r['tiles'] or ''} | "
            f"{halo} | "
            f"{r['best']:.2f} | {r['median']:.2f} | {r['cpu']:.2f} | {ratio} | {100 * r['steal']:.0f}% |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--tiles", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--modes", nargs="+", default=["inference", "training"])
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds (fastest step kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cuts", action="store_true", help="also each tile with the planner's cuts")
    ap.add_argument("--cuts-only", action="store_true",
                    help="with --cuts: only the planner's cuts rows (issue 13's acceptance rows, in minutes)")
    ap.add_argument("--compile", action="store_true", help="also each run with compile=True")
    ap.add_argument("--write", action="store_true", help="write its section of RESULTS.md")
    a = ap.parse_args()
    t0, rows = time.perf_counter(), []
    runs = variants(a.tiles, a.cuts, a.compile, not a.cuts_only)
    for mode in a.modes:
        for size in a.sizes:
            rounds = a.rounds if size <= 4096 else max(2, a.rounds // 2)
            rows += measure(mode, size, runs, rounds, a.threads)
            print(table(rows), flush=True)
    # the runs with cuts (or compile=) keep a section of their own, beside the plain tiles' rows
    key, what = ("ratios.py", "") if not (a.cuts or a.compile) else ("ratios.py --cuts", ", stages cut")
    title = f"## Engine: tiled / untiled time side by side{what} (benchmarks/ratios.py)"
    text = publish("ratios.py", title, [
        f"Machine: {machine()}. {a.threads} threads; load average at end {os.getloadavg()[0]:.1f}; "
        f"total {time.perf_counter() - t0:.0f} s. Each row: the fastest of {a.rounds} alternating steps "
        f"({max(2, a.rounds // 2)} above 4096²), in one process; ratios of the fastest steps.", "",
        table(rows), "",
    ], False)  # fmt: skip
    if a.write:
        write_section(key, text)


if __name__ == "__main__":
    main()
