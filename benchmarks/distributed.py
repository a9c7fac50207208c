"""Tiles across processes on this machine, and the predicted strong scaling on H100s.

    python benchmarks/distributed.py [--write] [--size 384] [--tile 96] [--repeats 3] [--no-scaling]

Part 1 runs one training step (forward and backward) of the same image in fresh processes:
1 process x 2 threads (no group), 2 processes x 1 thread and 3 processes x 1 thread
(``bp.tiled(..., group=WORLD)``, gloo on 127.0.0.1). Each rank reports its wall time, its compute
time and the seconds it spent in collectives. Before the steps the ranks calibrate gloo's
all-reduce (float64 tensors of 1 KiB to 16 MiB, median of 5): a least-squares line
t = a + b B gives a latency per ring step a / (2 (n-1)) and a bandwidth (2 (n-1)/n) / b, from
which ``perf.multi.communication`` predicts the step's collectives. Communication is measured two
ways: the seconds in collectives of the rank that spent least there (each rank's figure includes
waiting for slower ranks, and pickling the streamed reductions' partial results), and the step's
wall time less the slowest rank's compute (what the critical path spends outside compute).

Part 2 is the predicted strong scaling of a 100,000^2 ResNet-50 training step (MONAI resnet50,
BatchNorm frozen, bfloat16) on 1-64 H100-SXM, 8 per node, at the planner's one-device tile,
at a smaller one, and at the tile the planner chooses for N devices (``make_plan(devices=N)``).
``--no-scaling`` skips it (it needs monai).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from results import publish  # noqa: E402

import bigpicture as bp  # noqa: E402
from bigpicture.perf.devices import INTERCONNECTS, NODE_LINKS, Interconnect  # noqa: E402
from bigpicture.perf.multi import (  # noqa: E402
    LINK_EFFICIENCY,
    all_reduce_s,
    communication,
    predict_devices,
    tile_costs,
)

SIZES = [2**k for k in range(7, 22, 2)]  # float64 elements: 1 KiB .. 16 MiB


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def segmenter() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 2, 1),
    )  # fmt: skip


MODELS = {"classifier (streamed reduction)": classifier, "segmenter (dense output)": segmenter}


def _calibrate(world: int) -> list[float]:
    """Median seconds of a gloo all-reduce per size in SIZES (rank 0's clock, after a barrier)."""
    medians = []
    for n in SIZES:
        t = torch.ones(n, dtype=torch.float64)
        times = []
        for i in range(7):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(t)
            if i >= 2:
                times.append(time.perf_counter() - started)
        medians.append(statistics.median(times))
    return medians


def _worker(
    rank: int, world: int, port: int, threads: int, name: str, size: int, tile: int, repeats: int, out
):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    group = None
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.group.WORLD
    calibration = _calibrate(world) if world > 1 else None
    model = MODELS[name]()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    net = bp.tiled(model, tile=tile, group=group)
    walls, talks, computes = [], [], []
    for i in range(repeats + 1):  # the first step captures and plans
        model.zero_grad()
        if group is not None:
            dist.barrier()
        started = time.perf_counter()
        y = net(x)
        (y.square().mean()).backward()
        wall = time.perf_counter() - started
        ranks = net.report.ranks
        if i:
            walls.append(wall)
            talks.append(ranks.communication if ranks else 0.0)
            computes.append(ranks.seconds[rank] if ranks else wall)
    out.put((rank, {"wall": walls, "comm": talks, "compute": computes, "calibration": calibration}))
    if group is not None:
        dist.destroy_process_group()


def run(world: int, threads: int, name: str, size: int, tile: int, repeats: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    args = (world, port, threads, name, size, tile, repeats, queue)
    mp.start_processes(_worker, args=args, nprocs=world, join=True, start_method="spawn")
    return [r for _, r in sorted(queue.get() for _ in range(world))]


def fit_link(world: int, seconds: list[float]) -> Interconnect:
    """The loopback link that a ring all-reduce model fits to the calibration."""
    b, a = np.polyfit(np.array(SIZES, dtype=float) * 8, np.array(seconds), 1)
    latency = max(a, 0.0) / (2 * (world - 1))
    bandwidth = (2 * (world - 1) / world) / b
    return Interconnect(f"gloo {world} ranks", bandwidth / LINK_EFFICIENCY, latency, "measured here")


def calibration_section(calibrations: dict) -> list[str]:
    """gloo's all-reduce measured per size against the ring model fitted to it, for 2 and 3 ranks."""
    rows = [
        "| ranks | "
        + " | ".join(f"{8 * n / 2**10:,.0f} KiB" for n in SIZES)
        + " | fit: latency per ring step, "
        "bandwidth |",
        "|---|" + "---|" * (len(SIZES) + 1),
    ]
    for world, seconds in sorted(calibrations.items()):
        link = fit_link(world, seconds)
        cells = [
            f"{1e3 * t:.2f} / {1e3 * all_reduce_s(8 * n, world, 1, (link, link)):.2f} ms"
            for n, t in zip(SIZES, seconds)
        ]
        speed = link.bandwidth_bytes_per_s * LINK_EFFICIENCY / 1e9
        rows.append(
            f"| {world} | " + " | ".join(cells) + f" | {link.latency_s * 1e6:.0f} us, {speed:.2f} GB/s |"
        )
    return rows


def measured_section(size: int, tile: int, repeats: int, calibrations: dict) -> list[str]:
    rows = [
        "| model | processes x threads | step (median) | slowest rank computes | communication measured "
        "(least-waiting rank) | step - slowest compute | predicted | gloo fit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, make in MODELS.items():
        plan = bp.make_plan(make(), (1, 3, size, size), tile=tile, device="cpu", training=True)
        for world, threads in ((1, 1), (1, 2), (2, 1), (3, 1)):
            ranks = run(world, threads, name, size, tile, repeats)
            step = statistics.median(max(r["wall"][i] for r in ranks) for i in range(repeats))
            compute = statistics.median(max(r["compute"][i] for r in ranks) for i in range(repeats))
            talk = statistics.median(min(r["comm"][i] for r in ranks) for i in range(repeats))
            if world == 1:
                rows.append(f"| {name} | 1 x {threads} | {step:.3f} s | {compute:.3f} s | - | - | - | - |")
                continue
            calibrations.setdefault(world, ranks[0]["calibration"])
            link = fit_link(world, ranks[0]["calibration"])
            predicted = sum(s for _, s in communication(plan, world, 1, (link, link))[0])
            speed = link.bandwidth_bytes_per_s * LINK_EFFICIENCY / 1e9
            fit = f"{link.latency_s * 1e6:.0f} us/step, {speed:.2f} GB/s"
            rows.append(
                f"| {name} | {world} x 1 | {step:.3f} s | {compute:.3f} s | {1e3 * talk:.1f} ms | "
                f"{1e3 * (step - compute):.1f} ms | {1e3 * predicted:.1f} ms | {fit} |"
            )
    return rows


def scaling_section() -> list[str]:
    from monai.networks.nets import resnet50

    model = resnet50(spatial_dims=2, n_input_channels=3, conv1_t_stride=2, num_classes=2)
    bp.freeze_batchnorm(model)
    shape, rows = (1, 3, 100_000, 100_000), []
    one = bp.make_plan(model, shape, device="H100-SXM", dtype=torch.bfloat16, training=True, memory="80GiB")
    smaller = bp.make_plan(model, shape, tile=one.tile[0] // 2, device="H100-SXM", dtype=torch.bfloat16,
                           training=True)  # fmt: skip
    rows += [
        "| H100-SXM | nodes | " + " | ".join(
            f"tile {p.tile[0]} ({len(p.tiles)} tiles): step, speedup, imbalance, communication"
            for p in (one, smaller)
        ) + " | the planner's tile for N devices: tile (tiles), step, speedup over one device, imbalance |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    cells = {}
    for p in (one, smaller):
        single, costs = p.prediction, tile_costs(p)
        for n in (1, 2, 4, 8, 16, 32, 64):
            m = predict_devices(p, n, single=single, costs=costs)
            talk = sum(s for _, s in m.communication)
            cells.setdefault(n, []).append(
                f"{m.time:.2f} s, {m.speedup:.1f}x, {m.imbalance:.2f}, {1e3 * talk:.1f} ms"
            )
    for n in cells:
        if n == 1:
            cells[n].append(f"{one.tile[0]} ({len(one.tiles)}), {one.time:.2f} s, 1.0x, 1.00")
            continue
        m = bp.make_plan(model, shape, device="H100-SXM", dtype=torch.bfloat16, training=True, devices=n)
        balance = m.prediction.imbalance
        cells[n].append(
            f"{m.tile[0]} ({len(m.tiles)}), {m.time:.2f} s, {one.time / m.time:.1f}x, {balance:.2f}"
        )
    for n, row in cells.items():
        rows.append(f"| {n} | {max(1, n // 8)} | " + " | ".join(row) + " |")
    nv, ib = (INTERCONNECTS[k] for k in NODE_LINKS["H100-SXM"])
    params = sum(q.numel() for q in model.parameters() if q.requires_grad)
    peaks = ", ".join(
        f"{predict_devices(p, 8, single=p.prediction, costs=[1.0] * len(p.tiles)).memory / 2**30:.1f} GiB at "
        f"tile {p.tile[0]}"
        for p in (one, smaller)
    )
    rows += [
        "",
        f"Per device peak memory: {peaks} (the one-device figure plus the float64 gradient buffer). The "
        "table rests on: the one-device prediction of the performance model (its assumptions are in the "
        "perfmodel section; nothing here is measured on an H100); tiles shared in contiguous runs balanced "
        "by predicted tile cost, as the engine shares them; no overlap of communication with compute (the "
        f"engine combines after its last tile); {nv.name} at {nv.bandwidth_bytes_per_s / 1e9:.0f} GB/s and "
        f"{ib.name} at {ib.bandwidth_bytes_per_s / 1e9:.0f} GB/s per GPU per direction ({nv.source}; "
        f"{ib.source}), {100 * LINK_EFFICIENCY:.0f}% of it reached, {1e6 * nv.latency_s:.0f} / "
        f"{1e6 * ib.latency_s:.0f} us per ring step (assumed); a hierarchical ring all-reduce (within the "
        f"node, then across nodes); gradients all-reduced in float64 ({params / 1e6:.1f} M parameters: "
        f"{8 * params / 1e6:.0f} MB) once per pass; 8 GPUs per node. The last column is "
        "`make_plan(..., devices=N)`: the tile whose N-device step is predicted fastest within 80 GiB per "
        "device (one device's peak plus the gradient buffer).",
    ]
    return rows


def main(argv=None) -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--write", action="store_true", help="store the section in RESULTS.md")
    a.add_argument("--size", type=int, default=384)
    a.add_argument("--tile", type=int, default=96)
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--no-scaling", action="store_true")
    args = a.parse_args(argv)
    load, calibrations = os.getloadavg()[0], {}
    body = [
        f"Machine: {os.cpu_count()} cores, torch {torch.__version__}, load average {load:.1f} at the start "
        f"(other jobs were running), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"One training step on 1 x 3 x {args.size} x {args.size} px, tile {args.tile}, float32:",
        "",
        *measured_section(args.size, args.tile, args.repeats, calibrations),
        "",
        "gloo's all-reduce of float64 tensors on 127.0.0.1 (median of 5, after a barrier), measured / "
        "the ring model fitted to these points (``perf.multi.all_reduce_s`` with the fitted link):",
        "",
        *calibration_section(calibrations),
    ]
    if not args.no_scaling:
        body += [
            "",
            "Predicted strong scaling, ResNet-50 (MONAI, BatchNorm frozen) training step on 1 x 3 x "
            "100,000 x 100,000 px, bfloat16, H100-SXM, 8 per node (NVLink4 within, InfiniBand NDR between):",
            "",
            *scaling_section(),
        ]
    publish("distributed.py", "## Several processes: tiles across ranks", body, args.write)


if __name__ == "__main__":
    main()
