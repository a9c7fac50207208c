"""The ``bigpicture`` command (also ``python -m bigpicture``).

    bigpicture plan --model monai:DenseNet121 --model-args spatial_dims=2,in_channels=3,out_channels=2 \\
        --input 3x100000x100000 --device H100-SXM,A100-80GB,RTX-4090 --dtype bf16 --train
    bigpicture plan --model path/to/file.py:factory --input 1x512x512x512 --device cpu --tile 128
    bigpicture calibrate

Subcommands are added by hooks ``fn(subparsers)`` listed in ``HOOKS``; each registers its parser
and sets ``run`` (a function of the parsed arguments returning an exit status) as its default.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .cli_infer import add_infer_command
from .devices import DEVICES, calibrate, calibration_path, get_device, local_cpu
from .errors import TilingError
from .plan import plan_for_split
from .predict import _seconds, _size, predict_splits, read_seconds, with_reads
from .schedule import analyse, best_tile, parse_memory

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "tf32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp64": torch.float64,
    "float64": torch.float64,
}


def load_model(spec: str, args: dict) -> nn.Module:
    """``monai:DenseNet121``, ``package.module:factory`` or ``path/to/file.py:factory``, called with args."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise TilingError(
            f"--model {spec!r}: write SOURCE:NAME, e.g. monai:DenseNet121 or path/to/file.py:factory."
        )
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise TilingError(f"--model {spec!r}: no file {path}.")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        package = {"monai": "monai.networks.nets", "torchvision": "torchvision.models", "timm": "timm"}.get(
            where, where
        )
        try:
            module = importlib.import_module(package)
        except ImportError as e:
            raise TilingError(f"--model {spec!r}: cannot import {package} ({e}).") from e
    if not hasattr(module, name):
        raise TilingError(f"--model {spec!r}: {module.__name__} has no {name!r}.")
    model = getattr(module, name)(**args)
    if not isinstance(model, nn.Module):
        raise TilingError(f"--model {spec!r} made a {type(model).__name__}, not a torch.nn.Module.")
    return model


def parse_args_text(text: str) -> dict:
    """``a=1,b=(2,3),c=batch`` -> {"a": 1, "b": (2, 3), "c": "batch"}: Python literals, else strings."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += ch in "([{" and 1 or (-1 if ch in ")]}" else 0)
        if ch == "," and depth == 0:
            if text[start:i].strip():
                items.append(text[start:i])
            start = i + 1
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise TilingError(f"--model-args: {item!r} is not NAME=VALUE.")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def parse_input(text: str, batch: int) -> tuple[int, ...]:
    """``3x100000x100000`` (channels x spatial) -> (batch, 3, 100000, 100000)."""
    try:
        dims = tuple(int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        dims = ()
    if len(dims) < 2 or min(dims) < 1:
        raise TilingError(
            f"--input {text!r}: write CHANNELSxSPATIAL..., e.g. 3x100000x100000 or 1x512x512x512."
        )
    return (batch, *dims)


def _plan(a: argparse.Namespace) -> int:
    dtype = DTYPES.get(a.dtype.lower())
    if dtype is None:
        raise TilingError(f"--dtype {a.dtype!r}: known dtypes are {', '.join(DTYPES)}.")
    devices = [get_device(name.strip()) for name in a.device.split(",") if name.strip()]
    if (a.input is None) == (a.source is None):
        raise TilingError("give the input's size as --input 3x100000x100000, or a file as --source PATH")
    source = None
    if a.source is not None:
        from .io import as_source

        source = as_source(a.source)
        shape = tuple(source.shape)
    else:
        shape = parse_input(a.input, a.batch)
    reads: dict = {}  # per tile: the source's read seconds (timed once)
    model = load_model(a.model, parse_args_text(a.model_args))
    model.train() if a.train else model.eval()
    if a.train:
        from .tiled import freeze_batchnorm

        freeze_batchnorm(model)  # train-mode BatchNorm needs whole-image statistics
    splits = analyse(model, shape, a.multipass)
    mode = "training step (forward + backward)" if a.train else "inference"
    print(f"{a.model} on {'x'.join(map(str, shape))}, {str(dtype).removeprefix('torch.')}, {mode}")
    head = ("device", "memory", "tile", "tiles", "halo", "peak memory", "time", "note")
    rows = [head]
    for dev in devices:
        try:
            if a.tile:
                p = predict_splits(splits, shape, dtype, a.tile, dev, a.train)
                fits = p.memory <= (parse_memory(a.memory) if a.memory else dev.memory_bytes)
                note = "" if fits else "does not fit"
            else:
                p = best_tile(splits, shape, a.memory or dev.memory_bytes, dev, dtype, a.train)
                note = "planner"
            if source is not None:  # a GPU computes while net.run's reader reads; a CPU shares its cores
                if p.tile not in reads:
                    reads[p.tile] = read_seconds(plan_for_split(splits[-1], shape, dtype, p.tile), source)
                total, first = reads[p.tile]
                p = with_reads(p, (len(splits) * total, first), overlap=dev.name != "cpu")
        except TilingError as e:
            if "no tile fits" not in str(e):
                raise
            rows.append(
                (dev.name, _size(dev.memory_bytes), "-", "-", "-", "-", "-", str(e).split(": ", 1)[1])
            )
            continue
        rows.append(
            (
                dev.name,
                _size(dev.memory_bytes),
                "x".join(map(str, p.tile)),
                f"{p.tiles:,}",
                f"{100 * p.halo_overhead:.1f}%",
                _size(p.memory),
                _seconds(p.time),
                note,
            )
        )
        if a.verbose:
            print(p, end="\n\n")
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _calibrate(a: argparse.Namespace) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    cal = calibrate(a.path, quick=a.quick, clock=a.clock)
    cpu = local_cpu(a.path)
    best = max(p["forward"] for p in cal["ops"]["conv"])
    print(
        f"calibrated {cal['machine']['cpu'] or 'this CPU'} with {cal['threads']} threads ({a.clock} clock), "
        f"stored in {calibration_path(a.path)}"
    )
    print(
        f"  matmul fp32 {cpu.peak(torch.float32) / 1e9:.1f} GFLOP/s, convolution up to "
        f"{best / 1e9:.1f} GFLOP/s, copy {cpu.bandwidth_bytes_per_s / 1e9:.1f} GB/s, "
        f"{1e6 * cal['ops']['engine_node_s']:.0f} us per node per tile, "
        f"{1e6 * cal['ops']['wake_s']:.0f} us per multi-threaded op to wake idle threads "
        f"(OMP_WAIT_POLICY={cal['omp_wait_policy'] or 'unset'}: calibrate and run under the same)"
    )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    known = ", ".join(DEVICES)
    p = subparsers.add_parser(
        "plan",
        help="predict peak memory and time per device, and choose the tile",
        description=f"Known devices: {known}, and cpu (this machine).",
    )
    p.add_argument(
        "--model", required=True, help="monai:DenseNet121, package.module:factory or file.py:factory"
    )
    p.add_argument("--model-args", default="", help="keyword arguments, e.g. spatial_dims=2,in_channels=3")
    p.add_argument("--input", help="channels x spatial size, e.g. 3x100000x100000")
    p.add_argument(
        "--source",
        help="an input on disk (slide, zarr, TIFF, volume) instead of --input: its reads are timed and added",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu", help="comma-separated device names")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16 or fp64")
    p.add_argument("--train", action="store_true", help="a training step (forward + backward), not inference")
    p.add_argument("--memory", help="budget, e.g. 8GiB (default: each device's memory)")
    p.add_argument("--tile", type=int, help="predict this tile instead of choosing one")
    p.add_argument("--multipass", action="store_true", help="tile global norms with extra passes")
    p.add_argument("-v", "--verbose", action="store_true", help="print each device's full prediction")
    p.set_defaults(run=_plan)
    c = subparsers.add_parser("calibrate", help="measure this machine for predictions on 'cpu'")
    c.add_argument("--quick", action="store_true", help="a rough measurement in seconds")
    c.add_argument("--threads", type=int, help="torch threads to measure with (default: torch's)")
    c.add_argument("--clock", choices=["wall", "process"], default="wall")
    c.add_argument("--path", help="where to store it (default: $BIGPICTURE_CACHE or ~/.cache/bigpicture)")
    c.set_defaults(run=_calibrate)


HOOKS: list[Callable[[argparse._SubParsersAction], None]] = [add_commands, add_infer_command]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bigpicture", description="Exact tiled deep learning on huge images.")
    sub = ap.add_subparsers(dest="command", required=True)
    for hook in HOOKS:
        hook(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.run(a)
    except TilingError as e:
        print(f"bigpicture {a.command}: error: {e}", file=sys.stderr)
        return 2
