"""The input's reads in a prediction: timed on a few read boxes, extrapolated, overlapped."""

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import bigpicture as bp
from bigpicture.io.sources import Source
from bigpicture.perf.predict import predict, read_seconds, with_reads


class MeteredSource(Source):
    """An in-memory source whose reads advance a fake clock by 1 us per element read."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype, self.now = array, array.shape, array.dtype, 0.0
        self.reads = 0

    def read(self, region):
        out = self.array[region]
        self.now += out.size * 1e-6
        self.reads += 1
        return out


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)).eval()


@pytest.mark.parametrize("samples", [1, 3, 100])
def test_read_seconds_extrapolate_timed_reads_by_pixels(samples):
    src = MeteredSource(np.zeros((1, 3, 100, 90), np.uint8))
    plan = bp.make_plan(_model(), src.shape, tile=32)
    total, first = read_seconds(plan, src, samples=samples, clock=lambda: src.now)
    # 3 channels x 1 us per element: every tile's read box, and the first tile's alone
    assert total == pytest.approx(3e-6 * sum(t.read.numel for t in plan.tiles))
    assert first == pytest.approx(3e-6 * plan.tiles[0].read.numel)
    assert src.reads == min(samples, len(plan.tiles))  # a sample of the tiles, not all of them


def test_reads_overlap_the_compute_or_add_to_it():
    plan = bp.make_plan(_model(), (1, 3, 64, 64), tile=32)
    p = predict(plan, "cpu")
    slow, fast = (10 * p.time + 1.0, 0.5), (p.time / 10, p.time / 100)
    assert with_reads(p, slow).time == pytest.approx(slow[0] + slow[1])  # reading bounds the run
    assert with_reads(p, fast).time == pytest.approx(p.time + fast[1])  # compute bounds it
    assert with_reads(p, slow, overlap=False).time == pytest.approx(p.time + slow[0])
    assert with_reads(p, fast).stages[-1].name == "input reads (overlapped with the compute)"
    assert with_reads(p, fast).memory == p.memory


def test_predict_with_a_zarr_source_on_disk(tmp_path):
    x = torch.rand(1, 3, 96, 80)
    z = zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=x.shape, chunks=(1, 3, 32, 32), dtype="f4")
    z[:] = x.numpy()
    model = _model()
    plan = bp.make_plan(model, x.shape, tile=32)
    p = predict(plan, "cpu", source=tmp_path / "x.zarr")
    reads = p.stages[-1]
    assert reads.name == "input reads (in turn with the compute)" and reads.seconds > 0  # CPU: the same cores
    assert p.time == pytest.approx(predict(plan, "cpu", input_on_device=False).time + reads.seconds)
    gpu = predict(plan, "T4", source=tmp_path / "x.zarr")
    assert gpu.stages[-1].name == "input reads (overlapped with the compute)"
    assert (
        predict(plan, "T4", source=tmp_path / "x.zarr", prefetch=False).stages[-1].name.endswith("compute)")
    )
    with torch.no_grad():  # the plan the prediction is of runs exactly on the same source
        out = bp.tiled(model, tile=32).run(tmp_path / "x.zarr")
        torch.testing.assert_close(torch.as_tensor(np.asarray(out)), model(x))


def test_a_source_of_another_shape_is_refused():
    plan = bp.make_plan(_model(), (1, 3, 64, 64), tile=32)
    with pytest.raises(bp.TilingError, match=r"does not match the plan's input \(1, 3, 64, 64\)"):
        predict(plan, "cpu", source=np.zeros((1, 3, 64, 65), np.float32))
