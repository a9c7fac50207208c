"""An input read from disk in a prediction: the reads of a plan's tiles timed on a few read boxes
(``read_seconds``), added to a prediction overlapped with its compute or in turn (``with_reads``)."""

from __future__ import annotations

from dataclasses import replace

from bigpicture.engine.plan import Plan
from bigpicture.errors import TilingError
from bigpicture.perf.prediction import Prediction, Stage


def read_seconds(plan: Plan, source, samples: int = 8, clock=None) -> tuple[float, float]:
    """(seconds to read every tile's read box of ``plan`` and of its earlier passes from ``source``,
    seconds of the first tile's read), from timed reads of ``samples`` read boxes spread over the
    grid, extrapolated by pixels. Real reads: the source is opened, nothing else is computed."""
    import time

    import numpy as np

    from bigpicture.io import as_source

    clock = clock or time.perf_counter
    src = as_source(source)
    if len(src.shape) != len(plan.input_shape) or tuple(src.shape[2:]) != tuple(plan.input_shape[2:]):
        raise TilingError(
            f"source of shape {tuple(src.shape)} does not match the plan's input {tuple(plan.input_shape)}: "
            "plan for the source's shape (bp.make_plan(model, source.shape, ...))"
        )
    tiles = plan.tiles
    n = min(samples, len(tiles))
    picks = sorted({round(i * (len(tiles) - 1) / max(n - 1, 1)) for i in range(n)})
    seconds = sizes = 0.0
    for i in picks:
        started = clock()
        np.asarray(src[(slice(None), slice(None)) + tiles[i].read.slices()])
        seconds += clock() - started
        sizes += tiles[i].read.numel
    per_pixel = seconds / max(sizes, 1)
    passes = 1 + len(plan.earlier)  # multipass plans read every tile once per pass
    return passes * per_pixel * sum(t.read.numel for t in tiles), per_pixel * tiles[0].read.numel


def with_reads(prediction: Prediction, reads: tuple[float, float], overlap: bool = True) -> Prediction:
    """``prediction`` with the input's reads (``read_seconds``) added: overlapped with the compute
    (the longer of the two, plus the first read), or in turn."""
    total, first = reads
    compute = prediction.time
    time_s = max(compute, total) + first if overlap else compute + total
    mode = "overlapped with the compute" if overlap else "in turn with the compute"
    stages = (*prediction.stages, Stage(f"input reads ({mode})", 0, total))
    return replace(prediction, time=time_s, stages=stages)
