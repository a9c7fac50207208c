"""Memory and time of whole-image ops made exact: attention pooling and train-mode BatchNorm.

Each configuration runs in a fresh process: a warm-up step on a small image (capture, kernels,
threads), then the high-water mark is reset (/proc/self/clear_refs) and one step at the full size
is measured: peak RSS above the RSS before it (VmHWM - VmRSS), under MALLOC_MMAP_THRESHOLD_=65536
so that freed tensors leave the heap and the peak is that of live memory. Times come from
another fresh process without that variable (unmapping slows every allocation).

- ``mil``: a whole-slide classifier trained end to end from a lazy image: a small conv trunk
  (three strided convolutions to 64 features at 1/16 resolution, so that a 16384² step takes
  minutes, and the head is a larger share of the peak than behind a deep trunk), then a
  mean-pooling head or a gated-attention head (Ilse et al. 2018: softmax over every position,
  streamed). The attention head's peak is judged against the mean head's (target at most 1.2x).
- ``bn``: a training step of memory.py's ResNet with BatchNorm in training mode (exact, one
  pass over the tiles per level of BatchNorm) against the same step with ``bp.freeze_batchnorm``
  (one pass). Target: peak at most 1.3x; the time ratio is recorded.

    python benchmarks/globalops.py --quick                  # smoke run, small sizes
    python benchmarks/globalops.py --write                  # RESULTS.md section
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from memory import MiB, Synthetic, machine, proc, resnet
from results import publish

SECTION = "## Whole-image ops: attention pooling and train-mode BatchNorm (benchmarks/globalops.py)"
TARGETS = {"mil": ("mean", "attention", 1.2), "bn": ("frozen", "train", 1.3)}


def gated_attention_head(channels: int, hidden: int = 64, classes: int = 2):
    import torch
    from torch import nn

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.v, self.u = nn.Conv2d(channels, hidden, 1), nn.Conv2d(channels, hidden, 1)
            self.w, self.fc = nn.Conv2d(hidden, 1, 1), nn.Linear(channels, classes)

        def forward(self, h):
            a = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h)))
            return self.fc((torch.softmax(a.flatten(2), -1) @ h.flatten(2).transpose(1, 2))[:, 0])

    return Head()


def small_trunk(features: int = 64):
    """Three strided convolutions: 64 features at 1/16 of the image's resolution."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 16, 7, 4, 3), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                         nn.Conv2d(32, features, 3, 2, 1), nn.ReLU())  # fmt: skip


def build(cfg: dict):
    """(model, bp.tiled kwargs) of one configuration."""
    from torch import nn

    import bigpicture as bp

    if cfg["bench"] == "mil":
        head = (nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2))
                if cfg["variant"] == "mean" else gated_attention_head(64))  # fmt: skip
        return nn.Sequential(small_trunk(), head).train(), {}
    model = resnet(blocks=1).train()
    if cfg["variant"] == "frozen":
        return bp.freeze_batchnorm(model).train(), {}
    return model, {"multipass": True}


def one(cfg: dict) -> dict:
    import torch

    import bigpicture as bp

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    model, kw = build(cfg)
    net = bp.tiled(model, tile=cfg["tile"], **kw)

    def step(x):
        model.zero_grad(set_to_none=True)
        net(x).sum().backward()

    step(Synthetic(cfg["tile"]).materialise())  # warm-up, through the same passes
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from here
    base = proc("/proc/self/status", "VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    step(Synthetic(cfg["size"]))  # lazy: each tile reads its own region
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = proc("/proc/self/status", "VmHWM") - base
    return {"peak": peak, "time": seconds, "cpu": cpu, "tiles": len(net.plan.tiles),
            "passes": 1 + len(net.plan.earlier)}  # fmt: skip


def run(cfg: dict, memory: bool, timeout: float) -> dict:
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if memory else {})}
    try:
        p = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True,
                           text=True, timeout=timeout, env=env)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1][:160]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure(cfg: dict, timeout: float, timed: bool) -> dict:
    """Peak from a process with the mmap threshold; time from one without it (``timed``), else from
    the same process (slower: every large allocation maps and unmaps)."""
    mem = run(cfg, True, timeout)
    tim = run(cfg, False, timeout) if timed and "error" not in mem else mem
    if "error" in mem or "error" in tim:
        return {**cfg, "error": mem.get("error") or tim.get("error")}
    return {**cfg, **mem, "time": tim["time"], "cpu": tim["cpu"]}


def table(rows: list[dict]) -> list[str]:
    head = ["benchmark", "image", "tile", "variant", "tiles x passes", "peak MiB", "time s", "CPU s", "timed"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["bench"], f"{r['size']}²", str(r["tile"]), r["variant"]]
        if "error" in r:
            out.append("| " + " | ".join(cells + [r["error"], "", "", "", ""]) + " |")
            continue
        timed = "own process" if r["timed"] else "with the peak (mmap threshold)"
        cells += [f"{r['tiles']} x {r['passes']}", f"{r['peak'] / MiB:,.0f}", f"{r['time']:.1f}",
                  f"{r['cpu']:.1f}", timed]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return out


def checks(rows: list[dict]) -> list[str]:
    out, ok = [], {(r["bench"], r["variant"]): r for r in rows if "error" not in r}
    for bench, (ref, new, target) in TARGETS.items():
        if (bench, ref) in ok and (bench, new) in ok:
            a, b = ok[(bench, ref)], ok[(bench, new)]
            ratio, verdict = b["peak"] / a["peak"], "met" if b["peak"] / a["peak"] <= target else "MISSED"
            out.append(
                f"- {bench} at {b['size']}², tile {b['tile']}: peak {new} / {ref} = {ratio:.2f} "
                f"(target ≤ {target}: {verdict}); time {new} / {ref} = {b['time'] / a['time']:.2f} "
                f"(CPU {b['cpu'] / a['cpu']:.2f})"
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--mil-size", type=int, default=16384)
    ap.add_argument("--bn-size", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--benches", nargs="+", default=["mil", "bn"], choices=["mil", "bn"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timed", nargs="*", default=["bn"], help="benchmarks timed in a process of their own")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1024² images, tile 512")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--write", action="store_true", help="write the section into RESULTS.md")
    ap.add_argument("--load", nargs="+", help="publish the rows that earlier runs printed (their logs)")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(json.loads(a.one))))
        return
    if a.quick:
        a.mil_size, a.bn_size, a.tile = 1024, 1024, 512
    rows, t0, load = [], time.perf_counter(), os.getloadavg()
    for log in a.load or []:  # lines "[   350 s] {row}"
        rows += [json.loads(line.split("] ", 1)[1]) for line in Path(log).read_text().splitlines()
                 if line.startswith("[") and "] {" in line]  # fmt: skip
    for bench in [] if a.load else a.benches:
        size = a.mil_size if bench == "mil" else a.bn_size
        for variant in TARGETS[bench][:2]:
            cfg = {"bench": bench, "variant": variant, "size": size, "tile": a.tile, "threads": a.threads}
            rows.append({**measure(cfg, a.timeout, bench in a.timed), "timed": bench in a.timed})
            print(f"[{time.perf_counter() - t0:6.0f} s] {json.dumps(rows[-1])}", flush=True)
    publish("globalops.py", SECTION, [
        f"Machine: {machine()}. Load average (1 min) at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f};"
        f" total {time.perf_counter() - t0:.0f} s. Training steps (forward + backward), lazy input.",
        "", *table(rows), "", *checks(rows), "",
    ], a.write)  # fmt: skip


if __name__ == "__main__":
    main()
