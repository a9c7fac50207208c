"""Planning time and peak memory over networks and input sizes, each in a fresh process.

    python benchmarks/planning.py [--write] [--quick] [--only NETWORK] [--load LOG ...]

Each case runs in its own Python process: import torch and bigpicture (and torch's fake-tensor
machinery), build the network, capture it (torch.fx, timed apart), then plan it for a training
step on a device (H100-SXM and L4 in bfloat16, this CPU in float32) with no tile given (the
planner's tile for the device's memory, half the RAM on the CPU):
``choose_tile`` on the captured graph, i.e. shape propagation on fake tensors, the split, the
predictions of the candidate tiles that the search's bounds do not skip (``perf/search.py``) and the
chosen plan. Peak memory is the process's ru_maxrss
after planning, next to its value before (library start-up), and the planning's CPU seconds next to
its wall clock (on a shared machine the wall clock also counts the other jobs' turns). ``--write``
stores the table in RESULTS.md; ``--load`` makes it from the rows that earlier runs printed (runs of
``--only`` side by side, say), without planning again.
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

from results import publish

DEVICES = ("H100-SXM", "L4", "cpu")
CASES = [  # (network, input size, device)
    *[("MONAI UNet 3D", s, d) for s in (192, 512, 2048) for d in DEVICES],
    *[("MONAI DynUNet 3D", s, d) for s in (192, 512, 2048) for d in DEVICES],
    *[("ResNet-style classifier 2D", s, d) for s in (4096, 32768, 100_000) for d in DEVICES],
    *[("MONAI DenseNet121 2D", s, d) for s in (4096, 32768, 100_000) for d in DEVICES],
]
QUICK = [("MONAI UNet 3D", 192, "H100-SXM"), ("ResNet-style classifier 2D", 4096, "cpu")]


def network(name: str):
    from torch import nn

    if name == "MONAI UNet 3D":  # the case of issue 13
        from monai.networks.nets import UNet

        return UNet(3, 1, 3, (32, 64, 128, 256, 512), (2, 2, 2, 2), num_res_units=2, norm="batch"), 3
    if name == "MONAI DynUNet 3D":
        from monai.networks.nets import DynUNet

        kernels, strides = [3] * 5, [1, 2, 2, 2, 2]
        return DynUNet(3, 1, 3, kernels, strides, strides[1:], norm_name="batch"), 3
    if name == "MONAI DenseNet121 2D":
        from monai.networks.nets import DenseNet121

        return DenseNet121(spatial_dims=2, in_channels=3, out_channels=2), 2

    def block(c):
        return nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)
        )

    class Residual(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = block(c)

        def forward(self, x):
            return (x + self.body(x)).relu()

    layers, c = [nn.Conv2d(3, 32, 7, stride=2, padding=3), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 32
    for _ in range(4):
        layers += [Residual(c), Residual(c), nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)]
        c *= 2
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 2)), 2


def one(name: str, size: int, device: str = "H100-SXM") -> dict:
    """In this process: capture, then plan; seconds and ru_maxrss (MiB)."""
    import resource

    import torch
    import torch._dynamo  # noqa: F401 (fake tensors import it: library start-up, not planning)

    from bigpicture.engine.plan import capture
    from bigpicture.perf.devices import get_device, load_calibration
    from bigpicture.perf.schedule import budget_reason, choose_tile, default_budget

    torch.set_num_threads(1)
    model, nd = network(name)
    model.eval()
    shape = (1, 1 if nd == 3 else 3) + (size,) * nd
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    started = time.perf_counter()
    gm = capture(model)
    captured, cpu_started = time.perf_counter(), time.process_time()
    dev = get_device(device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    try:
        tile, plan, p = choose_tile(gm, shape, default_budget(dev), dev, dtype, training=True)
        chosen, tiles, note = "x".join(map(str, tile)), len(plan.tiles), budget_reason(dev) + "; " + p.note
    except Exception as e:  # a budget no tile fits is a result too
        chosen, tiles, note = "-", 0, f"{type(e).__name__}: {str(e)[:90]}"
    planned, cpu = time.perf_counter(), time.process_time() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    if device == "cpu":
        device += " (calibrated)" if load_calibration() else " (nominal)"
    return dict(
        network=name, size=size, nd=nd, device=device, capture_s=captured - started,
        plan_s=planned - captured, plan_cpu_s=cpu, rss_before=rss, rss_after=peak, tile=chosen, tiles=tiles,
        note=note, load=os.getloadavg()[0],
    )  # fmt: skip


def _fresh(name: str, size: int, device: str) -> dict | None:
    """One case planned in a fresh process; None (with its error printed) if the process failed."""
    command = [sys.executable, __file__, "--one", name, str(size), device]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if run.returncode:
        print(run.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="store the table in RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="two cases only")
    parser.add_argument("--only", help="the cases whose network contains this text")
    parser.add_argument("--load", nargs="+", metavar="LOG", help="the rows printed by earlier runs, in order")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per case (slowest, fastest)")
    parser.add_argument("--one", nargs=3, metavar=("NETWORK", "SIZE", "DEVICE"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]), a.one[2])))
        return
    rows = [ast.literal_eval(line) for log in a.load or [] for line in open(log) if line.startswith("{")]
    for name, size, device in (
        [] if a.load else QUICK if a.quick else [c for c in CASES if (a.only or "") in c[0]]
    ):
        runs = [_fresh(name, size, device) for _ in range(a.repeats)]
        runs = [r for r in runs if r is not None]
        if runs:
            r = max(runs, key=lambda r: r["plan_s"])  # the slowest is the one the 5 s target is held to
            r.update(repeats=len(runs), plan_s_min=min(x["plan_s"] for x in runs),
                     plan_cpu_s_min=min(x["plan_cpu_s"] for x in runs))  # fmt: skip
            rows.append(r)
            print(r, flush=True)
    body = [
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        "2 CPU cores shared with other jobs. Training step, no tile given: the planner's tile for the "
        "device's memory (H100-SXM 80 GiB and L4 24 GiB in bfloat16; this CPU in float32, half its RAM, "
        "with its calibration from `bigpicture calibrate` where the row says calibrated). A TilingError "
        "(no tile fits) is a result too. Planning = choose_tile on the captured graph (shape propagation "
        "on fake tensors, split, the candidates' bounds and predictions, the plan): wall-clock seconds, "
        "and the process's "
        "CPU seconds (what planning costs: the wall clock also counts the other jobs' turns on the cores); "
        "capture = torch.fx trace; memory = ru_maxrss of the fresh process, before planning (library "
        "start-up) and after; load = the machine's 1-minute load average as the row finished (2 cores: "
        "above 2, other jobs took turns with this one, so wall-clock times are upper bounds). With "
        "`--repeats N` every case is planned in N fresh processes: the planning columns give the slowest "
        "and the fastest (the work is the same in each: planning is deterministic, and the spread is the "
        "machine's), the other columns the slowest run's.",
        "",
        "| network | input | device | capture | planning (wall), slowest / fastest "
        "| planning (CPU), slowest / fastest | max RSS before / after | tile | tiles | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        side = f"{r['size']:,}^{r['nd']}"
        body.append(
            f"| {r['network']} | {side} | {r['device']} | {r['capture_s']:.2f} s | {_range(r, 'plan_s')} | "
            f"{_range(r, 'plan_cpu_s')} | {r['rss_before']} / {r['rss_after']} MiB | {r['tile']} | "
            f"{r['tiles']:,} | {r['load']:.1f} |"
        )
    publish("planning.py", "## Planner: planning time and memory (benchmarks/planning.py)", body, a.write)


def _range(r: dict, key: str) -> str:
    """Slowest / fastest of the repeats (rows from --load of older runs have one)."""
    low = r.get(key + "_min", r[key])
    return f"{r[key]:.2f} s" if r.get("repeats", 1) == 1 else f"{r[key]:.2f} / {low:.2f} s"


if __name__ == "__main__":
    main()
