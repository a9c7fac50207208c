"""Tiled runs with the host heap kept between tiles (the default, ``bigpicture.engine.host_heap``)
against glibc's default heap (``BIGPICTURE_HOST_HEAP=system``): time and page faults per step.

The heap policy is set once per process, so the two cannot alternate step by step in one process
(as ``ratios.py`` does): each configuration runs in fresh processes, the two policies alternating
(kept, system, kept, system, ...) for ``--rounds`` rounds; each process times ``--repeats`` steps
after one warm-up and reports the fastest step and the median step's page faults (ru_minflt) and
system time. The fastest step over all rounds counts, per policy (other jobs only add time).

    python benchmarks/host_heap.py --write               # perfmodel.py's networks, 2 threads (~6 min)
    python benchmarks/host_heap.py --quick               # small images, one round: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results import publish

HERE = Path(__file__).resolve().parent
SECTION = "## Engine: the host heap kept between tiles (benchmarks/host_heap.py)"
CONFIGS = [  # network (perfmodel.py's), tile, mode
    ("resnet", 256, "inference"),
    ("resnet", 256, "training"),
    ("resnet", 512, "training"),
    ("unet2d", 192, "training"),
    ("unet3d", 32, "inference"),
    ("unet3d", 48, "training"),
]
POLICIES = ("kept", "system")


def one(cfg: dict) -> dict:
    """In this (fresh) process: the fastest of ``repeats`` steps, the median step's faults and system time."""
    import resource

    import torch
    from perfmodel import QUICK_SHAPES, SHAPES, network

    import bigpicture as bp
    from bigpicture.engine import host_heap

    torch.set_num_threads(cfg["threads"])
    model = network(cfg["net"])
    model = bp.freeze_batchnorm(model.train()) if cfg["mode"] == "training" else model.eval()
    net = bp.tiled(model, tile=cfg["tile"])
    x = torch.randn((QUICK_SHAPES if cfg["quick"] else SHAPES)[cfg["net"]])

    def step() -> None:
        if cfg["mode"] == "inference":
            with torch.no_grad():
                net(x)
            return
        model.zero_grad(set_to_none=True)
        net(x).sum().backward()

    step()  # warm-up: plans; the heap grows to a step's peak
    times, faults, system = [], [], []
    for _ in range(cfg["repeats"]):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        times.append(seconds)
        faults.append(after.ru_minflt - before.ru_minflt)
        system.append(after.ru_stime - before.ru_stime)
    return {"policy": host_heap.policy(), "time": min(times), "faults": statistics.median(faults),
            "system_s": statistics.median(system)}  # fmt: skip


def run(cfg: dict, policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(BIGPICTURE_HOST_HEAP=policy, OMP_NUM_THREADS=str(cfg["threads"]))
    p = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True,
                       text=True, env=env, cwd=HERE, timeout=1800)  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"{cfg} under {policy}: {p.stderr.strip().splitlines()[-1:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if out["policy"] != policy:
        raise RuntimeError(f"asked for the {policy} heap, the process ran {out['policy']}")
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| network | tile | mode | kept s | system s | system / kept | faults per step kept | system | "
        "system time per step kept s | system |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k, s = r["kept"], r["system"]
        lines.append(
            f"| {r['net']} | {r['tile']} | {r['mode']} | {k['time']:.3f} | {s['time']:.3f} | "
            f"{s['time'] / k['time']:.2f} | {k['faults']:,.0f} | {s['faults']:,.0f} | "
            f"{k['system_s']:.3f} | {s['system_s']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small images, one round")
    ap.add_argument("--write", action="store_true", help="write the table into RESULTS.md")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(json.loads(a.one))))
        return
    rounds = 1 if a.quick else a.rounds
    start, load = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for net, tile, mode in CONFIGS:
        cfg = {"net": net, "tile": tile // (4 if a.quick else 1), "mode": mode, "threads": a.threads,
               "repeats": a.repeats, "quick": a.quick}  # fmt: skip
        best: dict = {}
        for _ in range(rounds):
            for policy in POLICIES:
                out = run(cfg, policy)
                if policy not in best or out["time"] < best[policy]["time"]:
                    best[policy] = out
        rows.append({**cfg, **best})
        kept, system = best["kept"]["time"], best["system"]["time"]
        print(f"[{time.perf_counter() - start:5.0f} s] {net} {tile} {mode}: kept {kept:.3f} s, "
              f"system {system:.3f} s", flush=True)  # fmt: skip
    from perfmodel import machine

    body = [
        f"{machine()}; load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
        f"{time.perf_counter() - start:.0f} s. Each cell: the fastest step of {a.repeats} x {rounds} fresh "
        "processes per policy, the policies alternating; faults and system time: that process's median step.",
        "",
        table(rows),
    ]
    publish("host_heap.py", SECTION, body, a.write and not a.quick)


if __name__ == "__main__":
    main()
