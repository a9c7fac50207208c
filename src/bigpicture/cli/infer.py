"""``bigpicture infer``: a model over a slide or volume, into a zarr store; interruptible, resumable.

    bigpicture infer --model monai:UNet --model-args spatial_dims=2,in_channels=3,out_channels=2,\\
        channels=(8,16,32),strides=(2,2) --weights unet.pt case.svs --out case_seg.zarr \\
        --tile 1024 --scale 0.00392156862745098 --tissue

Run the same command again after an interruption (Ctrl-C, a crash, a killed job): finished
tiles are kept and the rest is computed; different arguments are refused. A model with several
dense outputs writes each to its own array of the zarr group at --out (``case_seg.zarr/0``, ...).
``--memory 8GiB`` instead of ``--tile`` lets the planner choose the tile (printed, with why).

Started by torchrun (``torchrun --nproc-per-node 8 -m bigpicture infer ...``), the ranks share the
tiles, each on its own device (``LOCAL_RANK``'s GPU, or the CPU with ``--device cpu``), and write
them into the one store; run the same command again after a failure to resume.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch

from bigpicture.errors import TilingError


@dataclass(frozen=True)
class Affine:
    """The pointwise input transform ``x * scale + offset`` (in float32)."""

    scale: float = 1.0
    offset: float = 0.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)


def add_infer_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "infer", help="run a model over a slide or volume into a zarr store (resumable)",
        description=__doc__.split("\n\n")[0],
    )  # fmt: skip
    p.add_argument("input", help="a slide (svs, tiff, ndpi, ...), volume (nii, DICOM folder), zarr or .npy")
    p.add_argument("--out", required=True, help="the zarr store to write (resumed if it exists)")
    p.add_argument("--model", required=True, help="monai:UNet, package.module:factory or file.py:factory")
    p.add_argument("--model-args", default="", help="keyword arguments, e.g. spatial_dims=2,in_channels=3")
    p.add_argument("--weights", help="a state_dict saved with torch.save (or a checkpoint with 'state_dict')")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tile", type=int, help="input pixels each tile owns (default: the planner's)")
    size.add_argument("--memory", help="a budget, e.g. 8GiB or 512MiB: the planner chooses the fastest tile "
                      "predicted to fit it on --device")  # fmt: skip
    p.add_argument("--level", type=int, default=0, help="slide pyramid level (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="input transform x * scale + offset")
    p.add_argument("--offset", type=float, default=0.0)
    p.add_argument("--background", help="raw pixel value of background, e.g. 255 or 255,255,255: interior "
                   "tiles of only that value are computed once")  # fmt: skip
    p.add_argument("--tissue", action="store_true", help="set pixels outside an Otsu tissue mask to the "
                   "background value (default 255) and skip them")  # fmt: skip
    p.add_argument(
        "--device", default=None, help="cpu (default) or cuda:N; under torchrun each rank's own GPU"
    )
    p.add_argument("--multipass", action=argparse.BooleanOptionalAction, default=True,
                   help="extra passes over the tiles make global norms and squeeze-excitation exact "
                   "(default); --no-multipass: one pass, and such ops are an error")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="compile each tile geometry once with "
                   "torch.compile (fused pointwise and norm ops; the first tiles of each geometry wait "
                   "for the compiler; falls back to eager with a warning)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None,
                   help="read the next tile while one computes (default: on a GPU only)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=infer_main)


def infer_main(a: argparse.Namespace) -> int:
    from bigpicture.cli.common import load_model, parse_args_text
    from bigpicture.engine.inference import run
    from bigpicture.tiled import tiled

    try:
        model = load_model(a.model, parse_args_text(a.model_args))
        if a.weights:
            model.load_state_dict(_state_dict(a.weights))
        else:
            print("bigpicture infer: no --weights: the model keeps its initial weights", file=sys.stderr)
        device, group = _device(a.device)
        model = model.to(device).eval()
        source, background = _source(a)
        net = tiled(model, tile=a.tile, memory=a.memory, multipass=a.multipass, group=group,
                    compile=a.compile)  # fmt: skip
        speaks = group is None or torch.distributed.get_rank() == 0  # one rank prints
        if a.tile is None and speaks:  # the planner's: the plan that run() makes (and caches) now
            plan = net.plan_for(source, training=False)
            print(f"bigpicture infer: tile {' x '.join(map(str, plan.tile))} ({plan.note})")
        out = run(net, source, a.out, progress=speaks and not a.quiet, background=background,
                  prefetch=a.prefetch, resume=not a.overwrite)  # fmt: skip
    except KeyboardInterrupt:
        print(f"\nbigpicture infer: interrupted; run the same command again to resume into {a.out}",
              file=sys.stderr)  # fmt: skip
        return 130
    except (FileNotFoundError, ImportError) as e:
        print(f"bigpicture infer: error: {e}", file=sys.stderr)
        return 2
    for line in _written(a.out, out) if speaks else ():
        print(f"bigpicture infer: {line}")
    return 0


def _written(path: str, out) -> list[str]:
    """What the run wrote (each dense output's array) and what it only computed (reduced outputs)."""
    leaves: list = []

    def walk(value, place):
        if isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                walk(v, (*place, str(i)))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, (*place, str(k)))
        else:
            leaves.append((".".join(place), value))

    walk(out, ())
    lines = []
    for place, value in leaves:
        name = getattr(value, "path", None) if not isinstance(value, torch.Tensor) else None
        shape = tuple(getattr(value, "shape", ()))
        if name is None:
            lines.append(f"output {place or 0}, shape {shape}, is reduced over the image and not stored "
                         "(bigpicture.engine.inference.run returns it)")  # fmt: skip
        else:
            lines.append(f"wrote {path}{'/' + name if name else ''}, shape {shape}")
    return lines


def _device(device: str | None):
    """The model's device and, under torchrun, the process group sharing the tiles."""
    from bigpicture.engine.distributed import init_from_env, launched

    if not launched():
        return torch.device(device or "cpu"), None
    return init_from_env(device), torch.distributed.group.WORLD


def _state_dict(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise TilingError(f"--weights {path}: cannot load it with torch.load ({e})") from e
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _source(a: argparse.Namespace):
    """The input as the model sees it, and the background value in those units (or None)."""
    from bigpicture.engine.background import MaskedSource, tissue_mask
    from bigpicture.io import as_source, open_slide

    source = open_slide(a.input, level=a.level) if a.level else as_source(a.input)
    raw = None if a.background is None else [float(v) for v in a.background.split(",")]
    if a.tissue:
        raw = raw or [255.0]
        source = MaskedSource(source, tissue_mask(source), fill=raw if len(raw) > 1 else raw[0])
    affine, transformed = Affine(a.scale, a.offset), (a.scale, a.offset) != (1.0, 0.0)
    if transformed:
        source = as_source(source, affine)
    if raw is None:
        return source, None
    return source, (affine(np.asarray(raw)) if transformed else np.asarray(raw)).tolist()
