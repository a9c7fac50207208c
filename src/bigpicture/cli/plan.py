"""``bigpicture plan``: predicted peak memory and time per device, and the planner's tile.

    bigpicture plan --model monai:DenseNet121 --model-args spatial_dims=2,in_channels=3,out_channels=2 \\
        --input 3x100000x100000 --device H100-SXM,A100-80GB,RTX-4090 --dtype bf16 --train
    bigpicture plan --model path/to/file.py:factory --input 1x512x512x512 --device cpu --tile 128
    bigpicture plan --model ... --input 3x100000x100000 --device 8xH100-SXM,64xH100-SXM --train

``8xH100-SXM``: one image's tiles shared by 8 of them (8 per node; ``bp.tiled(..., group=)``).
"""

from __future__ import annotations

import argparse

from bigpicture.cli.common import DTYPES, load_model, parse_args_text, parse_input
from bigpicture.engine.batchnorm import freeze_batchnorm
from bigpicture.engine.plan import plan_for_split
from bigpicture.errors import TilingError
from bigpicture.perf.devices import DEVICES, get_device
from bigpicture.perf.predict import _seconds, _size, predict_splits, read_seconds, with_reads
from bigpicture.perf.schedule import analyse, best_tile, default_budget, parse_memory


def _plan(a: argparse.Namespace) -> int:
    dtype = DTYPES.get(a.dtype.lower())
    if dtype is None:
        raise TilingError(f"--dtype {a.dtype!r}: known dtypes are {', '.join(DTYPES)}.")
    devices = [_count_and_device(name.strip()) for name in a.device.split(",") if name.strip()]
    if (a.input is None) == (a.source is None):
        raise TilingError("give the input's size as --input 3x100000x100000, or a file as --source PATH")
    source = None
    if a.source is not None:
        from bigpicture.io import as_source

        source = as_source(a.source)
        shape = tuple(source.shape)
    else:
        shape = parse_input(a.input, a.batch)
    reads: dict = {}  # per tile: the source's read seconds (timed once)
    model = load_model(a.model, parse_args_text(a.model_args))
    model.train() if a.train else model.eval()
    if a.train:
        freeze_batchnorm(model)  # train-mode BatchNorm needs whole-image statistics
    splits = analyse(model, shape, a.multipass)
    mode = "training step (forward + backward)" if a.train else "inference"
    print(f"{a.model} on {'x'.join(map(str, shape))}, {str(dtype).removeprefix('torch.')}, {mode}")
    head = ("device", "memory", "tile", "tiles", "halo", "peak memory", "time", "note")
    rows, made = [head], []  # made: the first device's prediction, for --plot
    for count, dev in devices:
        try:
            if a.tile:
                p = predict_splits(splits, shape, dtype, a.tile, dev, a.train)
                fits = p.memory <= (parse_memory(a.memory) if a.memory else default_budget(dev))
                note = "" if fits else "does not fit"
            elif count > 1:  # the tile for N devices (shares, imbalance, communication), not for one
                p = _best_on_devices(splits, shape, dtype, dev, a, count).single
                note = "planner for N devices"
            else:
                p = best_tile(splits, shape, a.memory or default_budget(dev), dev, dtype, a.train)
                note = "planner"
            if source is not None:  # a GPU computes while net.run's reader reads; a CPU shares its cores
                if p.tile not in reads:
                    reads[p.tile] = read_seconds(plan_for_split(splits[-1], shape, dtype, p.tile), source)
                total, first = reads[p.tile]
                p = with_reads(p, (len(splits) * total, first), overlap=dev.name != "cpu")
            if count > 1:
                p = _on_devices(p, splits, shape, dtype, dev, a.train, count)
                note = "; ".join(filter(None, [note, p.summary]))
        except TilingError as e:
            if "no tile fits" not in str(e):
                raise
            rows.append(
                (dev.name, _size(dev.memory_bytes), "-", "-", "-", "-", "-", str(e).split(": ", 1)[1])
            )
            continue
        made.append(p)
        rows.append(
            (
                dev.name if count == 1 else f"{count}x{dev.name}",
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
    if a.plot and made:
        from bigpicture.cli.plot import plot_plan

        plot_plan(a.plot, plan_for_split(splits[-1], shape, dtype, made[0].tile), made[0], source)
        print(f"plot of the plan on {made[0].device}: {a.plot}")
    return 0


def _count_and_device(text: str):
    """``"8xH100-SXM"`` -> (8, the H100-SXM entry); ``"cpu"`` -> (1, this CPU)."""
    count, _, name = text.partition("x") if text.split("x", 1)[0].isdigit() else ("1", "", text)
    return int(count), get_device(name)


def _on_devices(p, splits, shape, dtype, dev, training: bool, count: int):
    """The prediction ``p`` for one device, as ``count`` devices sharing the tiles predict it."""
    from dataclasses import replace

    from bigpicture.perf.multi import predict_devices

    plans = [plan_for_split(s, shape, dtype, p.tile) for s in splits]
    plan = replace(plans[-1], earlier=tuple(plans[:-1]), device=dev, training=training)
    return predict_devices(plan, count, single=p)


def _best_on_devices(splits, shape, dtype, dev, a: argparse.Namespace, count: int):
    """The tile whose step on ``count`` devices is predicted fastest (``perf.multi.best_on_devices``)."""
    from functools import partial

    from bigpicture.perf.multi import best_on_devices
    from bigpicture.perf.schedule import candidates, least_time

    budget = parse_memory(a.memory or default_budget(dev))
    bound = partial(least_time, splits, shape, dtype, device=dev, training=a.train)
    tiles = candidates(splits, shape)
    return best_on_devices(splits, shape, budget, dev, dtype, a.train, count, None, tiles, bound)


def add_plan_command(subparsers: argparse._SubParsersAction) -> None:
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
    p.add_argument("--multipass", action=argparse.BooleanOptionalAction, default=True,
                   help="extra passes over the tiles make global norms and squeeze-excitation exact "
                   "(default); --no-multipass: one pass, and such ops are an error")  # fmt: skip
    p.add_argument(
        "--plot", metavar="PNG", help="draw the first device's tiles and time per stage (matplotlib)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print each device's full prediction")
    p.set_defaults(run=_plan)
