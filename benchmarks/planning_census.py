"""Planning time and memory of every network of the MONAI census (benchmarks/census.py), at large sizes.

    python benchmarks/planning_census.py [--write] [--only NAME ...] [--load LOG ...]

Each census row (family and 2D/3D, at the census's own settings) runs in its own Python process:
import torch, bigpicture and MONAI, build the network (float32, eval mode), capture it (torch.fx), then
plan a training step with no tile given (the planner's tile for the device's memory) at two input
sizes (2D: 16,384^2 and 100,000^2; 3D: 256^3 and 2,048^3) on two devices (H100-SXM in bfloat16, this
CPU in float32 with its calibration when there is one): ``schedule.choose_tile`` on the captured
graph, as in `planning.py`. Each plan's wall-clock and CPU seconds are timed apart; the memory is the
process's ru_maxrss after all four plans (so an upper bound of each), next to its value after start-up
and capture. A network that does not take the size (a fixed input size: positional embeddings, a
flatten into a linear layer) or that no tile fits is a result too: the error is shown.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from results import publish

HERE = Path(__file__).parent
SIZES = {2: (16_384, 100_000), 3: (256, 2_048)}
DEVICES = ("H100-SXM", "cpu")


def one(index: int) -> dict:
    """In this process: the census row ``index`` captured once and planned at each size and device."""
    import resource

    import torch
    import torch._dynamo  # noqa: F401 (fake tensors import it: library start-up, not planning)
    from census import case_id, cases

    from bigpicture.engine.plan import capture
    from bigpicture.perf.devices import get_device
    from bigpicture.perf.schedule import choose_tile, default_budget

    torch.set_num_threads(1)
    torch.manual_seed(0)
    case = cases()[index]
    out = dict(case=case_id(case), dims=case.dims, plans=[])
    try:
        model = case.build().eval()  # captured as `bp.make_plan` does: checked against an input of the case's
        gm = capture(model, inputs=[(tuple(case.shape), torch.float32, torch.device("cpu"))])
    except Exception as e:  # noqa: BLE001 (a network the capture refuses is a row too)
        out["error"] = f"capture: {type(e).__name__}: {str(e)[:120]}"
        return out
    out["rss_start"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    for size in SIZES[case.dims]:
        shape = tuple(case.shape[:2]) + (size,) * case.dims
        for name in DEVICES:
            dev = get_device(name)
            dtype = torch.float32 if name == "cpu" else torch.bfloat16
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                tile, plan, _ = choose_tile(gm, shape, default_budget(dev), dev, dtype, training=True)
                result = f"tile {'x'.join(map(str, tile))}, {len(plan.tiles):,} tiles"
            except Exception as e:  # noqa: BLE001 (a size the network does not take is a result too)
                result = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            out["plans"].append(
                dict(size=size, device=name, wall=time.perf_counter() - wall, cpu=time.process_time() - cpu,
                     result=result)
            )  # fmt: skip
    out["rss_end"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    out["load"] = os.getloadavg()[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="store the table in RESULTS.md")
    parser.add_argument("--only", nargs="*", help="census rows whose id contains one of these")
    parser.add_argument("--load", nargs="+", metavar="LOG", help="the rows printed by earlier runs, in order")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.one is not None:
        print(json.dumps(one(a.one)))
        return
    from census import case_id, cases

    rows = [ast.literal_eval(line) for log in a.load or [] for line in open(log) if line.startswith("{")]
    for index, case in enumerate([] if a.load else cases()):
        if a.only and not any(o.lower() in case_id(case).lower() for o in a.only):
            continue
        run = subprocess.run([sys.executable, __file__, "--one", str(index)], capture_output=True, text=True,
                             timeout=900)  # fmt: skip
        if run.returncode:
            print(run.stderr[-2000:], file=sys.stderr)
            rows.append(dict(case=case_id(case), dims=case.dims, plans=[], error=f"exit {run.returncode}"))
            continue
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    title = "## Planner: every census network at large sizes (benchmarks/planning_census.py)"
    publish("planning_census.py", title, table(rows), a.write)


def table(rows: list[dict]) -> list[str]:
    plans = [p for r in rows for p in r["plans"]]
    slowest = max(plans, key=lambda p: p["wall"], default=None)
    rss = max((r["rss_end"] for r in rows if "rss_end" in r), default=0)
    body = [
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        "2 CPU cores (load = 1-minute load average when the row ended: above 2, other jobs shared the "
        "cores and the wall clock is an upper bound; the CPU seconds are the planning's own). Per row, one "
        "process; per plan, wall / CPU seconds and the outcome. Memory: ru_maxrss after capture / after all "
        "four plans.",
        "",
        f"{len(plans)} plans of {len(rows)} census rows. Slowest plan: "
        + (f"{slowest['wall']:.2f} s wall, {slowest['cpu']:.2f} s CPU" if slowest else "none")
        + f"; largest process: {rss} MiB.",
        "",
        "| census row | size | H100-SXM (bf16) | CPU (float32) | memory | load |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["plans"]:
            body.append(f"| {r['case']} | - | {r.get('error', '')} | | | |")
            continue
        for size in dict.fromkeys(p["size"] for p in r["plans"]):
            cells = [
                _cell(p) for name in DEVICES for p in r["plans"] if p["size"] == size and p["device"] == name
            ]
            memory = f"{r['rss_start']} / {r['rss_end']} MiB"
            body.append(
                f"| {r['case']} | {size:,}^{r['dims']} | {' | '.join(cells)} | {memory} | {r['load']:.1f} |"
            )
    return body


def _cell(p: dict) -> str:
    return f"{p['wall']:.2f} / {p['cpu']:.2f} s: {p['result'].replace('|', '/')}"


if __name__ == "__main__":
    main()
