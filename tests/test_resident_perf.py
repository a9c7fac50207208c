"""The CPU's inference peak over the tiles in run order, with the boundary's pages written so far
(perf/resident.py)."""

import itertools
import math

import numpy as np
import pytest
import torch
from test_rates import _rates
from torch import nn

import bigpicture as bp
from bigpicture.perf.grid import layout
from bigpicture.perf.predict import least_memory, predict_splits
from bigpicture.perf.resident import PAGE_BYTES, boundary_bytes, dense_sinks, resident_bytes
from bigpicture.perf.walk import tile_at, walk


class Dense(nn.Module):
    """A segmentation-like network: a dense output as big as the image, values alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(y) + x


CASES = {  # name: (image shape, tile)
    "4x3 tiles, lines under a page": ((1, 2, 64, 48), 16),
    "uneven last tiles": ((1, 2, 50, 37), 16),
    "lines over a page": ((1, 2, 24, 1500), 8),
}


def _split(shape, tile):
    return bp.make_plan(Dense().eval(), shape, tile=tile).split


@pytest.mark.parametrize("case", CASES)
def test_inference_peak_is_the_largest_over_tiles_in_run_order(case):
    """The class-wise prediction equals the walk of every tile in run order, each adding the
    boundary's pages resident once it has written (a reference with no class grouping)."""
    shape, tile = CASES[case]
    split, rates = _split(shape, tile), _rates(0.0)
    lay = layout(split, shape, tile)
    p = predict_splits([split], shape, torch.float32, tile, "cpu", shared={"rates": rates})
    parts = dict(p.memory_parts)
    reference = 0
    for index in itertools.product(*map(range, lay.grid)):  # row-major: the engine's run order
        need, writes = tile_at(split, lay, index)
        one = walk(split, need, writes, torch.float32, rates, False, False, True)
        reference = max(reference, one.peak + resident_bytes(split, lay, index, 4))
    assert parts["tile working set"] + parts["boundary tensors"] == reference
    assert parts["boundary tensors"] <= boundary_bytes(split, 4)
    least = least_memory([split], shape, torch.float32, tile, "cpu", shared={"rates": rates})
    assert least <= p.memory  # still a lower bound for the planner


def _pages_written(split, lay, last: tuple[int, ...], item: int) -> int:
    """Bytes of the pages of the dense sinks that the tiles up to ``last`` (run order) write into,
    from a map of every page (each sink page-aligned, as a fresh allocation is)."""
    total = 0
    for k in dense_sinks(split):
        shape = split.shapes[k]
        written = np.zeros(shape, dtype=bool)
        for index in itertools.product(*map(range, lay.grid)):
            box = tile_at(split, lay, index)[1][split.sinks.index(k)]
            written[(slice(None), slice(None), *box.slices())] = True
            if index == last:
                break
        byte = np.repeat(written.reshape(-1), item)
        pages = np.pad(byte, (0, -len(byte) % PAGE_BYTES)).reshape(-1, PAGE_BYTES).any(axis=1)
        total += int(pages.sum()) * PAGE_BYTES
    return total


@pytest.mark.parametrize("case", CASES)
def test_resident_bytes_follow_the_pages_the_tiles_write(case):
    """Within a page per line of the tile row being written (and the array's last page): the model
    takes a line's run to touch part of the page after it, as it does on average."""
    shape, tile = CASES[case]
    split = _split(shape, tile)
    lay = layout(split, shape, tile)
    (sink,) = dense_sinks(split)
    planes, extent = math.prod(split.shapes[sink][:2]), split.extents[sink]
    for index in itertools.product(*map(range, lay.grid)):
        model, pages = resident_bytes(split, lay, index, 4), _pages_written(split, lay, index, 4)
        lines = tile_at(split, lay, index)[1][0].shape[0] if extent[-1] * 4 > PAGE_BYTES else 1
        assert abs(model - pages) <= planes * (lines + 1) * PAGE_BYTES, index
    last = tuple(g - 1 for g in lay.grid)
    assert resident_bytes(split, lay, last, 4) == boundary_bytes(split, 4)  # all of it in the end


@pytest.mark.parametrize("training, device", [(True, "cpu"), (False, "A100-80GB")])
def test_training_and_gpus_hold_the_whole_boundary(training, device):
    """Training's backward runs after the forward wrote every tile; a GPU allocates the whole tensor."""
    shape, tile = CASES["4x3 tiles, lines under a page"]
    model = bp.freeze_batchnorm(Dense().train()) if training else Dense().eval()
    split = bp.make_plan(model, shape, tile=tile, training=training).split
    shared = {"rates": _rates(0.0)} if device == "cpu" else None
    p = predict_splits([split], shape, torch.float32, tile, device, training, shared=shared)
    assert dict(p.memory_parts)["boundary tensors"] == boundary_bytes(split, 4)
