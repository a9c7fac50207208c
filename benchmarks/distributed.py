"""Tiles across processes on this machine, and the predicted strong scaling on H100s.

    python benchmarks/distributed.py [--write] [--size 384] [--tile 96] [--repeats 3] [--no-scaling]

Part 1 runs one training step (forward and backward) of the same image in fresh processes:
1 process x 2 threads (no group), 2 processes x 1 thread and 3 processes x 1 thread
(``bp.tiled(..., group=WORLD)``, gloo on 127.0.0.1). Each rank reports its wall time, its compute
time and every collective it made (``engine.collectives.counted``: name, bytes, seconds). Before
the steps the ranks calibrate gloo's all-reduce (1 KiB to 16 MiB) and all-gather (1 to 64 KiB per
rank), median of 9, rank 0 arriving 3 ms after the others as the last rank does in a step, and fit
the ring model of ``perf.comm`` in log space: a latency per ring step and a bandwidth, each size
counting by its relative error (``fit_link``).
``perf.comm.communication`` then predicts the step's collectives (each one the engine sends,
``perf.comm.collectives``; the table shows both counts). Communication is measured three ways:
per collective, the seconds of the rank that spent least in it (the last to arrive, which waits
for no one), summed over the step's collectives -- what the model predicts; the seconds in
collectives of the rank that spent least there overall (each rank's figure includes waiting for
slower ranks, and packing the partial results); and the step's wall time less the slowest rank's
compute (what the critical path spends outside compute, imbalance included).

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
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from results import publish  # noqa: E402

import bigpicture as bp  # noqa: E402
from bigpicture.engine.collectives import all_gather_single, counted  # noqa: E402
from bigpicture.perf.comm import (  # noqa: E402
    LINK_EFFICIENCY,
    all_gather_s,
    all_reduce_s,
    collectives,
    communication,
)
from bigpicture.perf.devices import INTERCONNECTS, NODE_LINKS, Interconnect  # noqa: E402
from bigpicture.perf.multi import predict_devices, tile_costs  # noqa: E402

SIZES = [2**k for k in range(7, 22, 2)]  # float64 elements: 1 KiB .. 16 MiB
CALIBRATION_REPEATS = 9
GATHERED = 2**13  # elements: the all-gather is calibrated up to 64 KiB
LATE_S = 0.003  # rank 0 reaches each calibrating collective this much after the others


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


def _calibrate(world: int) -> dict[str, list[float]]:
    """Median seconds of a gloo all-reduce and of an all-gather (``all_gather_single``, what the
    engine gathers its packed results by) per size in SIZES, on rank 0's clock, rank 0 arriving
    ``LATE_S`` after the others, as in a step: the ranks reach each collective at different times
    (their shares differ), the early ones block in it, and the last waits for no one but pays
    for waking them (tens of microseconds idle, milliseconds on a loaded machine)."""
    medians = {"all_reduce": [], "all_gather": []}
    for n in SIZES:  # the all-gather only up to 64 KiB: the engine gathers slots of a few KiB
        t = torch.ones(n, dtype=torch.float64)
        out = torch.empty(world * n, dtype=torch.float64)
        calls = {
            "all_reduce": partial(dist.all_reduce, t),
            "all_gather": partial(all_gather_single, out, t, None),
        }
        for kind, call in calls.items():
            if kind == "all_gather" and n > GATHERED:
                continue
            times = []
            for i in range(CALIBRATION_REPEATS + 2):
                dist.barrier()
                if dist.get_rank() == 0:
                    time.sleep(LATE_S)
                started = time.perf_counter()
                call()
                if i >= 2:
                    times.append(time.perf_counter() - started)
            medians[kind].append(statistics.median(times))
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
    walls, talks, computes, sent = [], [], [], []
    for i in range(repeats + 1):  # the first step captures and plans
        model.zero_grad()
        if group is not None:
            dist.barrier()
        with counted() as calls:
            started = time.perf_counter()
            y = net(x)
            (y.square().mean()).backward()
            wall = time.perf_counter() - started
        ranks = net.report.ranks
        if i:
            walls.append(wall)
            talks.append(ranks.communication if ranks else 0.0)
            computes.append(ranks.seconds[rank] if ranks else wall)
            sent.append(calls)
    results = {"wall": walls, "comm": talks, "compute": computes, "calibration": calibration, "calls": sent}
    out.put((rank, results))
    if group is not None:
        dist.barrier()  # every rank done with its collectives before any tears gloo down
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


def _terms(kind: str, world: int, elements: int) -> tuple[int, float]:
    """A ring collective's latency steps and the bytes each rank sends through the ring."""
    nbytes = 8 * elements
    if kind == "all_reduce":
        return 2 * (world - 1), 2 * (world - 1) / world * nbytes
    return world - 1, (world - 1) * nbytes


def fit_link(world: int, measured: dict[str, list[float]]) -> Interconnect:
    """The loopback link of the ring model (``perf.comm``): the latency per ring step and the
    bandwidth that minimise the squared log error over every size of both collectives (a grid of
    400 x 400), so that each point counts by its relative error: the small sizes set the latency,
    the large ones the bandwidth, and the engine's mid sizes (0.1-1 MiB) are not left to either.
    (A straight line through the times let the 16 MiB points set the latency: 1.0 ms fitted
    against 0.3 ms measured at 1 KiB.)"""
    points = [(*_terms(k, world, n), t) for k, ts in measured.items() for n, t in zip(SIZES, ts)]
    steps, nbytes, seconds = (np.array(x, dtype=float) for x in zip(*points))
    latency = np.logspace(-6, -1.5, 400)[:, None, None]
    bandwidth = np.logspace(7, 11, 400)[None, :, None]
    error = ((np.log(steps * latency + nbytes / bandwidth) - np.log(seconds)) ** 2).sum(-1)
    i, j = np.unravel_index(error.argmin(), error.shape)
    speed = float(bandwidth[0, j, 0])
    return Interconnect(
        f"gloo {world} ranks", speed / LINK_EFFICIENCY, float(latency[i, 0, 0]), "measured here"
    )


def calibration_section(calibrations: dict) -> list[str]:
    """gloo's collectives measured per size against the ring model fitted to them, for 2 and 3 ranks."""
    rows = [
        "| ranks | collective | "
        + " | ".join(f"{8 * n / 2**10:,.0f} KiB" for n in SIZES)
        + " | fit: latency per ring step, bandwidth |",
        "|---|---|" + "---|" * (len(SIZES) + 1),
    ]
    model = {"all_reduce": all_reduce_s, "all_gather": all_gather_s}
    for world, measured in sorted(calibrations.items()):
        link = fit_link(world, measured)
        speed = link.bandwidth_bytes_per_s * LINK_EFFICIENCY / 1e9
        for kind, seconds in measured.items():
            cells = [
                f"{1e3 * t:.2f} / {1e3 * model[kind](8 * n, world, 1, (link, link)):.2f} ms"
                for n, t in zip(SIZES, seconds)
            ]
            cells += ["-"] * (len(SIZES) - len(cells))
            rows.append(
                f"| {world} | {kind} | "
                + " | ".join(cells)
                + f" | {link.latency_s * 1e6:.0f} us, {speed:.2f} GB/s |"
            )
    return rows


def per_call_least(ranks: list[dict], step: int) -> tuple[float, int]:
    """Seconds of one step's collectives without the waiting: per collective, the rank that spent
    least in it (the last to arrive waits for no one), summed; and how many collectives it made."""
    calls = [r["calls"][step] for r in ranks]
    assert len({len(c) for c in calls}) == 1, "the ranks made different collectives"
    return sum(min(c[j][2] for c in calls) for j in range(len(calls[0]))), len(calls[0])


def measured_section(size: int, tile: int, repeats: int, calibrations: dict) -> list[str]:
    rows = [
        "| model | processes x threads | step (median) | slowest rank computes | collectives per step: "
        "engine / model | communication measured (per collective, least rank) | predicted | "
        "in collectives, least-waiting rank | step - slowest compute | gloo fit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, make in MODELS.items():
        plan = bp.make_plan(make(), (1, 3, size, size), tile=tile, device="cpu", training=True)
        for world, threads in ((1, 1), (1, 2), (2, 1), (3, 1)):
            ranks = run(world, threads, name, size, tile, repeats)
            step = statistics.median(max(r["wall"][i] for r in ranks) for i in range(repeats))
            compute = statistics.median(max(r["compute"][i] for r in ranks) for i in range(repeats))
            if world == 1:
                cells = f"{step:.3f} s | {compute:.3f} s | - | - | - | - | - | -"
                rows.append(f"| {name} | 1 x {threads} | {cells} |")
                continue
            waited = statistics.median(min(r["comm"][i] for r in ranks) for i in range(repeats))
            least = [per_call_least(ranks, i) for i in range(repeats)]
            talk = statistics.median(t for t, _ in least)
            calibrations.setdefault(world, ranks[0]["calibration"])
            link = fit_link(world, ranks[0]["calibration"])
            talks = communication(plan, world, 1, (link, link))[0]
            predicted = sum(s for k, s in talks if k != "packing")  # packing is outside the collectives
            count = len(collectives(plan, world))
            speed = link.bandwidth_bytes_per_s * LINK_EFFICIENCY / 1e9
            fit = f"{link.latency_s * 1e6:.0f} us/step, {speed:.2f} GB/s"
            rows.append(
                f"| {name} | {world} x 1 | {step:.3f} s | {compute:.3f} s | {least[0][1]} / {count} | "
                f"{1e3 * talk:.1f} ms | {1e3 * predicted:.1f} ms | {1e3 * waited:.1f} ms | "
                f"{1e3 * (step - compute):.1f} ms | {fit} |"
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
    a.add_argument("--repeats", type=int, default=5)
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
        "The engine sends, per pass, one all-gather of the streamed reductions' partial results and "
        "each rank's seconds (raw bytes in fixed 4 KiB slots), one all-reduce per dense output the "
        "tail uses and, training, one all-reduce of the float64 parameter gradients carrying each "
        "rank's backward seconds: 2 collectives per step for the classifier, 3 for the segmenter "
        "(before 2026-12-02: 4 and 5, the partial results by `all_gather_object`, two collectives "
        "plus pickling, and the backward seconds by an all-gather of their own). The predicted "
        "column is `perf.comm.communication` with the fitted link, packing (about 0.1 ms) left out "
        "as it is outside the collectives. Under load, a rank woken in a collective after computing "
        "waits for the scheduler (its share of the CPU is spent), which the calibration's ranks, idle "
        "between collectives, do not: compare on an idle machine. (At load 14 on 2 cores, 2026-12-02, "
        "the steps' collectives took 10-20x the calibrated time of the same sizes.)",
        "",
        "gloo's all-reduce and all-gather (``all_gather_single``) of float64 tensors on 127.0.0.1 (median "
        "of 9, rank 0 arriving 3 ms after the others), measured / the ring model with the link fitted "
        "to them (``perf.comm``; latency per ring step and bandwidth by least squares of the log "
        "times, so small and large sizes count alike):",
        "",
        *calibration_section(calibrations),
    ]
    ended = f" at the start, {os.getloadavg()[0]:.1f} at the end of part 1"
    body[0] = body[0].replace(" at the start", ended, 1)
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
