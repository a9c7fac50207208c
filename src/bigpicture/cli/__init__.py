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
import sys
from collections.abc import Callable

from bigpicture.cli.calibrate import add_calibrate_command
from bigpicture.cli.infer import add_infer_command
from bigpicture.cli.plan import add_plan_command
from bigpicture.errors import TilingError

HOOKS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_plan_command,
    add_calibrate_command,
    add_infer_command,
]


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
