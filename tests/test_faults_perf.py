"""Page faults of a tiled CPU run (perf/faults.py, rates.heap_fault_bytes) and their calibration."""

import numpy as np
import pytest
import torch
from torch import nn

import bigpicture as bp
from bigpicture.perf.devices import get_device, local_cpu
from bigpicture.perf.grid import layout
from bigpicture.perf.predict import _predict_pass
from bigpicture.perf.rates import GLIBC_MMAP_THRESHOLD_MAX, Rates, heap_fault_bytes

MiB = 2**20


@pytest.mark.parametrize(
    "peak, largest, tiles, faulted",
    [
        (28 * MiB, 8 * MiB, 4, 4 * 28 * MiB),  # the resnet, tile 512: over twice its largest block
        (17 * MiB, 9 * MiB, 4, 0),  # under the trim threshold: the heap is kept
        (16 * MiB, 8 * MiB, 4, 0),  # at it: kept
        (80 * MiB, 100 * MiB, 2, 2 * 80 * MiB),  # glibc's threshold stops rising at 32 MiB (64 to trim)
        (60 * MiB, 100 * MiB, 2, 0),
    ],
)
def test_heap_is_faulted_in_again_only_over_glibcs_trim_threshold(peak, largest, tiles, faulted):
    assert GLIBC_MMAP_THRESHOLD_MAX == 32 * MiB
    assert heap_fault_bytes(peak, largest, tiles) == faulted


def test_heap_fault_bytes_on_arrays_is_the_same_per_entry():
    peaks, largest, tiles = (
        np.array([28, 17, 80, 60]) * MiB,
        np.array([8, 9, 100, 100]) * MiB,
        np.array([4, 4, 2, 2]),
    )
    want = [heap_fault_bytes(p, g, t) for p, g, t in zip(peaks, largest, tiles, strict=True)]
    assert heap_fault_bytes(peaks, largest, tiles).tolist() == want


def _rates(fault_s_per_byte: float) -> Rates:
    stream = {k: [[1, 1e10], [2**30, 1e10]] for k in ("unary", "binary", "norm", "copy")}
    point = {"nd": 2, "cin": 8, "cout": 8, "kernel": 9, "fan_in": 72, "positions": 4096, "stride": 1,
             "transposed": False, "backend": None, "forward": 1e10, "backward": 1e10}  # fmt: skip
    ops = {"dtype": "float32", "conv": [point], "stream": stream, "pool": {"forward": [[1, 1e9]],
           "backward": [[1, 1e9]]}, "engine_node_s": 0.0, "engine_train_node_s": 0.0, "wake_s": 0.0,
           "fault_s_per_byte": fault_s_per_byte}  # fmt: skip
    return Rates(local_cpu(), torch.float32, {"ops": ops})


class Pooled(nn.Module):
    """Several values alive at once per tile, and a global pooling: no big boundary tensor."""

    def __init__(self, pool: bool) -> None:
        super().__init__()
        self.a, self.b, self.pool = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), pool

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = self.b(y) + y + x
        return z.mean((2, 3)) if self.pool else z


def _predict(model, rates, training=False):
    shape, tile = (1, 8, 128, 128), 32
    model = bp.freeze_batchnorm(model.train()) if training else model.eval()
    split = bp.make_plan(model, shape, tile=tile, training=training).split
    p = _predict_pass(split, shape, torch.float32, layout(split, shape, tile), rates.device, rates, training,
                      False, True)  # fmt: skip
    return p, {s.name: s.seconds for s in p.stages}


@pytest.mark.parametrize("training", [False, True])
def test_tiles_whose_heap_is_trimmed_pay_their_working_set_in_faults(training):
    p, stages = _predict(Pooled(pool=True), _rates(1e-9), training)
    working = dict(p.memory_parts)["tile working set"]
    inference, _ = _predict(Pooled(pool=True), _rates(1e-9))  # training: its forward pass's faults
    peak = dict(inference.memory_parts)["tile working set"]
    assert p.tiles == 16 and working > 0
    assert stages["page faults"] == pytest.approx(16 * peak * 1e-9)
    assert dict(p.by_kind)["page faults"] == stages["page faults"]
    assert p.time == pytest.approx(sum(stages.values()))
    without, _ = _predict(Pooled(pool=True), _rates(0.0), training)  # uncalibrated: no faults
    assert "page faults" not in {s.name for s in without.stages}
    assert p.time - without.time == pytest.approx(stages["page faults"])


def test_a_dense_output_keeps_the_heap_and_gpus_pay_no_faults():
    """The whole-size output (freed each step) raises glibc's threshold over a tile's working set."""
    _, stages = _predict(Pooled(pool=False), _rates(1e-9))
    assert "page faults" not in stages
    gpu = Rates(get_device("A100-80GB"), torch.float32)
    assert gpu.fault_s_per_byte == 0.0


def test_calibration_measures_the_cost_of_fresh_pages():
    import functools
    import time

    from bigpicture.perf.calibrate import _fault_cost
    from bigpicture.perf.timing import seconds_per_call

    cost = _fault_cost(True, functools.partial(seconds_per_call, clock=time.process_time), 0.002)
    assert 0.0 <= cost < 1e-6  # seconds per byte: under a microsecond per byte on any machine
