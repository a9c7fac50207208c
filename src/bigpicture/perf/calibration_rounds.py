"""Calibrations of several rounds, merged: ``bigpicture calibrate --rounds N``.

On a host shared with other jobs (a cloud VM's neighbours on the same caches, memory and clocks) the
speed of one and the same op swings by a quarter or more for minutes at a time: measured here, three
calibrations of one idle machine taken back to back predicted the perfmodel benchmark's runs 15-40%
apart. Each figure of one calibration is the best of several trials seconds apart, so it is the
op's speed in whatever phase the host was in during those seconds; rounds minutes apart, each
figure's best kept, give every op the speed of the host's undisturbed phases, as the benchmark's
timed runs keep the fastest of their repeats and rounds.

Merged per figure: rates (convolutions' forward, backward and weights' gradient, memory-bound and
pooling rates, matmul and copy rates) the largest of the rounds, the launch overhead the least; the
engine's costs (``engine_costs``: differences of a tiled run and its ops, each a best) the median of
the rounds, as a difference of bests is no best itself; workspaces (bytes, not times) the first round's.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

_CONV_RATES = ("forward", "backward", "backward_weight")
_RATE_TABLES = ("stream", "stream_backward", "pool")  # {kind: [[size, rate], ...]}
_ENGINE = ("engine_node_s", "engine_train_node_s", "wake_s")


def best_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One calibration from ``rounds`` (``calibrate``'s dicts, measured alike): the first round's
    with every timed figure merged as the module says. Rounds that were not measured alike (other
    grids, sizes or kinds) raise ValueError."""
    if not rounds:
        raise ValueError("best_of needs at least one calibration round")
    out = copy.deepcopy(rounds[0])
    ops = out["ops"]
    for other in rounds[1:]:
        theirs = other["ops"]
        if len(theirs["conv"]) != len(ops["conv"]):
            raise ValueError("calibration rounds measured different convolution grids")
        for mine, their in zip(ops["conv"], theirs["conv"], strict=True):
            if _shape(mine) != _shape(their):
                raise ValueError(f"calibration rounds disagree on a convolution: {_shape(mine)}")
            for key in _CONV_RATES:
                if key in mine:
                    mine[key] = max(mine[key], their[key])
        for table in _RATE_TABLES:
            for kind, rows in ops.get(table, {}).items():
                theirs_rows = theirs[table][kind]
                if [r[0] for r in rows] != [r[0] for r in theirs_rows]:
                    raise ValueError(f"calibration rounds measured {table} {kind!r} at other sizes")
                for row, their in zip(rows, theirs_rows, strict=True):
                    row[1] = max(row[1], their[1])
        for dtype, sizes in out.get("matmul", {}).items():
            for n, rate in sizes.items():
                sizes[n] = max(rate, other["matmul"][dtype][n])
        for mine, their in zip(out.get("conv2d", []), other.get("conv2d", []), strict=True):
            mine["flops_per_s"] = max(mine["flops_per_s"], their["flops_per_s"])
        if "bandwidth_bytes_per_s" in out:
            out["bandwidth_bytes_per_s"] = max(out["bandwidth_bytes_per_s"], other["bandwidth_bytes_per_s"])
        if "launch_overhead_s" in out:
            out["launch_overhead_s"] = min(out["launch_overhead_s"], other["launch_overhead_s"])
    for key in _ENGINE:
        ops[key] = statistics.median(r["ops"][key] for r in rounds)
    out["rounds"] = len(rounds)
    return out


def _shape(point: dict) -> tuple:
    """What a convolution point measured (everything but its rates)."""
    return tuple(sorted((k, v) for k, v in point.items() if k not in _CONV_RATES))
