"""The planner's pruned search chooses what predicting every candidate chooses.

``search.search`` skips the full prediction of tiles whose time bound (``bound.time_bound``) is
already no faster than the best tile so far, and bounds memory with walks that count bytes only
(``bytes_only.bytes_only``). The reference is the exhaustive search (every candidate whose memory bound
fits predicted): the chosen tile and its whole prediction must be equal, on a table of networks,
sizes, devices (this CPU uncalibrated and calibrated, GPUs), budgets, training and inference, and
on random networks (hypothesis). The bound itself must stay below every prediction it stands for.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_multipass import Norms
from test_planning_speed import calibrated, unet2d
from test_random_architectures import blueprints, examples
from torch import nn

from bigpicture.engine.tiles import Diagonal, working_counts
from bigpicture.perf import bound, predict
from bigpicture.perf.bytes_only import bytes_only
from bigpicture.perf.devices import get_device
from bigpicture.perf.grid import layout
from bigpicture.perf.memory_bound import least_memories
from bigpicture.perf.predict import least_memory, predict_splits
from bigpicture.perf.schedule import analyse, candidates, least_time
from bigpicture.perf.search import search
from bigpicture.perf.walk import grads, last_tile, walk
from bigpicture.perf.work_bound import work_bound


@pytest.fixture(autouse=True)
def _calibration(tmp_path, monkeypatch, request):
    """This CPU uncalibrated, or calibrated with ``test_planning_speed.calibrated``'s table (rates
    that differ by backend and size) for the cases whose device says so."""
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))
    table = {"ops": calibrated().ops}
    spec = getattr(request.node, "callspec", None)
    if "calibrated" in str(spec.params.get("device", "") if spec else ""):
        monkeypatch.setattr(predict, "load_calibration", lambda: table)


def wide_field():
    """A receptive field of ~60 px: small tiles pay halos many times their work."""
    layers = [nn.Conv2d(1, 4, 7, padding=3), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Conv2d(4, 4, 5, padding=4, dilation=2), nn.BatchNorm2d(4), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2), nn.Conv2d(4, 2, 3, padding=1))


def net3d():
    return nn.Sequential(
        nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2), nn.Conv3d(2, 2, 5, padding=2), nn.ReLU()
    )


NETWORKS = {  # name: (factory, input shape)
    "wide field 2d": (wide_field, (1, 1, 160, 144)),
    "unet 2d": (unet2d, (1, 1, 128, 96)),
    "3d": (net3d, (1, 1, 40, 36, 32)),
}
DEVICES = {"cpu": torch.float32, "cpu calibrated": torch.float32, "H100-SXM": torch.bfloat16,
           "L4": torch.bfloat16}  # fmt: skip


def chosen(splits, shape, budget, device, dtype, training, exhaustive):
    """(the prediction ``best_tile`` chooses, the tiles the time bound skipped, the predictions made)."""
    tiles = candidates(splits, shape)
    tried, bounds, _, skipped, _ = search(splits, shape, tiles, budget, get_device(device.split()[0]), dtype,
                                       training, least_time, exhaustive)  # fmt: skip
    fits = [p for p in tried if p.memory <= budget]
    best = min(fits, key=lambda p: (p.time, -math.prod(p.tile))) if fits else None
    return best, skipped, tried


def _budgets(splits, shape, device, dtype, training):
    """The budgets that make the planner choose each candidate's size: between their peaks."""
    peaks = sorted({predict_splits(splits, shape, dtype, t, device.split()[0], training).memory
                    for t in candidates(splits, shape)})  # fmt: skip
    mids = [math.ceil((a + b) / 2) for a, b in zip(peaks[:-1], peaks[1:], strict=True)]
    return [peaks[-1], *mids[:: max(1, len(mids) // 3)]]  # the whole image, and a few across the range


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("device", list(DEVICES))
@pytest.mark.parametrize("name", list(NETWORKS))
def test_the_pruned_search_chooses_as_predicting_every_tile(name, device, training):
    factory, shape = NETWORKS[name]
    torch.manual_seed(0)
    splits, dtype = analyse(factory().eval(), shape), DEVICES[device]
    for budget in _budgets(splits, shape, device, dtype, training):
        pruned, skipped, _ = chosen(splits, shape, budget, device, dtype, training, False)
        every, none, tried = chosen(splits, shape, budget, device, dtype, training, True)
        assert none == 0
        assert pruned == every, (budget, pruned.tile, every.tile)  # the whole prediction, field by field


@pytest.mark.parametrize("levels", ["every level", "no tight level"])
@pytest.mark.parametrize("device", ["cpu calibrated"])
@pytest.mark.parametrize("name", ["wide field 2d", "3d"])
def test_the_bound_skips_predictions(name, device, levels, monkeypatch):
    """The table above is not vacuous: with halos many times the work, small tiles are bounded
    slower than the whole image and not predicted; the work at the fastest rates (``work_bound``)
    alone skips some."""
    if levels == "no tight level":
        monkeypatch.setattr(bound, "pass_bound", lambda *args: 0.0)
    factory, shape = NETWORKS[name]
    splits, dtype = analyse(factory().eval(), shape), DEVICES[device]
    budget = _budgets(splits, shape, device, dtype, True)[0]
    pruned, skipped, tried = chosen(splits, shape, budget, device, dtype, True, False)
    every, _, all_tried = chosen(splits, shape, budget, device, dtype, True, True)
    assert pruned == every and skipped > 0 and len(tried) + skipped == len(all_tried)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("device", list(DEVICES))
@pytest.mark.parametrize("name", list(NETWORKS))
def test_the_time_bound_is_below_every_prediction(name, device, training):
    factory, shape = NETWORKS[name]
    splits, dtype = analyse(factory().eval(), shape), DEVICES[device]
    for tile in candidates(splits, shape):
        p = predict_splits(splits, shape, dtype, tile, device.split()[0], training)
        b = bound.time_bound(splits, shape, dtype, tile, device.split()[0], training, {})
        assert 0 < b <= p.time * (1 + 1e-9), (tile, b, p.time)  # equal where the host time decides
        _levels(splits, shape, dtype, tile, device.split()[0], training)
        assert least_time(splits, shape, dtype, tile, device.split()[0], training) <= b * (1 + 1e-9)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("device", ["cpu calibrated", "H100-SXM"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_walks_that_count_bytes_only_count_the_same_bytes(name, device, training):
    """``least_memory``'s walks (rates of 1, no backend asked) have the peaks of full walks."""
    factory, shape = NETWORKS[name]
    splits, dtype = analyse(factory().eval(), shape), DEVICES[device]
    rates = predict._setting(device.split()[0], dtype, None, {})[1]
    s = splits[0]
    for tile in candidates(splits, shape):
        need, writes = last_tile(s, layout(s, shape, tile))
        full = walk(s, need, writes, dtype, rates, training)
        counted = walk(s, need, writes, dtype, bytes_only(rates), training)
        assert (counted.peak, counted.peak_train) == (full.peak, full.peak_train), tile
        assert least_memory(splits, shape, dtype, tile, device.split()[0], training) > 0


@given(blueprints(nd=2, dag=True, max_steps=4), st.sampled_from(list(DEVICES)), st.booleans())
@examples(25)
def test_random_networks_plan_as_predicting_every_tile(blueprint, device, training):
    if device == "cpu calibrated":
        device = "cpu"  # the fixture patches by the test's parameters only; hypothesis draws here
    torch.manual_seed(0)
    model, shape = blueprint.build().float().eval(), (1,) + tuple(blueprint.input_shape[1:])
    splits, dtype = analyse(model, shape), DEVICES[device]
    peaks = sorted(
        predict_splits(splits, shape, dtype, t, device, training).memory for t in candidates(splits, shape)
    )
    budget = peaks[len(peaks) // 2]
    pruned, _, _ = chosen(splits, shape, budget, device, dtype, training, False)
    every, _, _ = chosen(splits, shape, budget, device, dtype, training, True)
    assert pruned == every


LONG = {  # grids of 10 to 80 tiles per dimension: the interior's rows repeat (``grid.dim_keys``)
    "wide field 2d": (wide_field, (1, 1, 640, 576), [(16, 16), (24, 40), (64, 48)]),
    "unet 2d": (unet2d, (1, 1, 512, 392), [(8, 8), (6, 10), (24, 40)]),  # 6: a period of 2 tiles
    "3d": (net3d, (1, 1, 120, 72, 96), [(8, 8, 8), (12, 6, 8)]),
}


@pytest.mark.parametrize("name", list(LONG))
def test_the_bounds_dimension_tables_are_those_of_every_row(name):
    """``bound.dim_tables`` reads the rows near the borders and one period: per dimension, its
    distinct rows of lengths, counted, are those of every grid index, and its last row the last's."""
    factory, shape, tiles = LONG[name]
    splits = analyse(factory().eval(), shape)
    s = splits[0]
    for tile in tiles:
        lay = layout(s, shape, tile)
        assert max(lay.grid) > 8
        tables = bound.dim_tables(s, lay)
        rows = [Diagonal(s, lay).row(j)[1] for j in range(max(lay.grid))]
        for d, t in enumerate(tables):
            boxes = [n for (n, what) in t.columns if what == "box"]
            every = [tuple(rows[j][n].shape[d] for n in boxes) for j in range(lay.grid[d])]
            counted = {tuple(r[: len(boxes)]): 0 for r in t.lengths.tolist()}
            for r, c in zip(t.lengths.tolist(), t.counts.tolist(), strict=True):
                counted[tuple(r[: len(boxes)])] += c
            assert counted == {r: every.count(r) for r in every}, (tile, d)
            assert tuple(t.lengths[t.last][: len(boxes)].tolist()) == every[-1], (tile, d)


def _ratios(splits, shape, dtype, device, training, tiles, known=True):
    """Time bound / prediction of each tile (``known``: every tile has a bound); the memory bound is
    at most the predicted peak too."""
    out = []
    for tile in tiles:
        p = predict_splits(splits, shape, dtype, tile, device, training)
        assert 0 < least_memory(splits, shape, dtype, tile, device, training) <= p.memory, tile
        b = bound.time_bound(splits, shape, dtype, tile, device, training, {})
        assert 0 < b <= p.time * (1 + 1e-9), (tile, b, p.time)
        if _levels(splits, shape, dtype, tile, device, training) or known:
            out.append(b / p.time)
    return out


def _levels(splits, shape, dtype, tile, device, training) -> bool:
    """Per pass, the time bound's levels are in order: the engine's cost alone, at most the work at
    the fastest rates (``work_bound``), at most the prediction's step seconds (``pass_bound``), and
    the whole bound is their sum (where the tight level is known: True)."""
    shared = {}
    rates = predict._setting(device, dtype, None, shared)[1]
    item, known, total = torch.empty((), dtype=dtype).element_size(), True, 0.0
    for s in splits:
        lay = layout(s, shape, tile)
        engine = bound.engine_bound(s, lay, rates, training)
        tables = bound.dim_tables(s, lay)
        if tables is None or any(working_counts(s, lay, k) != lay.grid for k in s.sinks):
            known, total = False, total + engine
            continue
        grad = grads(s, Diagonal(s, lay).row(0)[1], False)
        work = work_bound(s, tables, lay.grid, item, rates, training, grad, {})
        tight = bound.pass_bound(s, lay, dtype, rates, training, (tables, grad))
        assert 0 < work <= tight * (1 + 1e-9), (tile, work, tight)
        assert engine <= tight * (1 + 1e-9), (tile, engine, tight)
        total += max(engine, work, tight)
    assert bound.time_bound(splits, shape, dtype, tile, device, training, shared) == pytest.approx(total)
    return known


@given(blueprints(nd=2, dag=True, max_steps=5), st.sampled_from([*DEVICES, "cpu strided"]), st.booleans())
@examples(30)
def test_the_time_bound_is_below_the_prediction_of_random_networks(blueprint, device, training):
    """Random architectures (residuals, U-Nets, branches, channel splits; windows that pad natively
    or read padded copies, pooling, resampling, norms): the bound of every candidate tile is at
    most its prediction, on GPUs and this CPU uncalibrated and calibrated."""
    tables = {"cpu calibrated": {"ops": calibrated().ops}, "cpu strided": _strided_calibration()}
    torch.manual_seed(0)
    model, shape = blueprint.build().float().eval(), (1,) + tuple(blueprint.input_shape[1:])
    splits = analyse(model, shape)
    with pytest.MonkeyPatch.context() as patch:  # hypothesis draws here: the fixture cannot patch
        if device in tables:
            patch.setattr(predict, "load_calibration", lambda: tables[device])
        dtype = DEVICES.get(device, torch.float32)
        _ratios(splits, shape, dtype, device.split()[0], training, candidates(splits, shape), known=False)


def _strided_calibration() -> dict:
    """``calibrated``'s table with a strided normalisation faster than the plain one at small sizes
    and slower at large ones, forward and backward: the bound must take the faster at each size."""
    ops = dict(calibrated().ops)
    ops["stream"] = {**ops["stream"], "norm_strided": [[1, 8e8], [2**20, 2e9], [2**30, 1e9]]}
    ops["stream_backward"] = {"norm": [[1, 1e8], [2**30, 2e9]], "norm_strided": [[1, 3e8], [2**30, 1e9]]}
    return {"ops": ops}


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", ["wide field 2d", "norms", "long unet 2d"])
def test_the_time_bound_takes_the_faster_of_plain_and_strided_norms(name, training, monkeypatch):
    table = _strided_calibration()
    monkeypatch.setattr(predict, "load_calibration", lambda: table)
    if name == "norms":
        factory, shape = (lambda: Norms(2)), (1, 2, 190, 220)
    else:
        factory, shape = NETWORKS[name] if name in NETWORKS else LONG[name.removeprefix("long ")][:2]
    splits = analyse(factory().eval(), shape)
    _ratios(splits, shape, torch.float32, "cpu", training, candidates(splits, shape))


@pytest.mark.parametrize("device", list(DEVICES))
@pytest.mark.parametrize("name", list(LONG))
def test_the_time_bound_is_near_the_prediction(name, device):
    """The bound leaves out only the copies of windows' inputs (at the image border, and where a
    node reads a sub-box of its input): within a few percent of the prediction, so candidates
    within a few percent of the best are skipped without a prediction."""
    factory, shape, tiles = LONG[name]
    splits = analyse(factory().eval(), shape)
    ratios = _ratios(splits, shape, DEVICES[device], device.split()[0], True, tiles)
    assert min(ratios) > 0.9, ratios


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("device", list(DEVICES))
@pytest.mark.parametrize("name", list(LONG))
def test_the_time_bound_is_below_the_prediction_on_long_grids(name, device, training):
    factory, shape, tiles = LONG[name]
    splits, dtype = analyse(factory().eval(), shape), DEVICES[device]
    for tile in tiles:
        p = predict_splits(splits, shape, dtype, tile, device.split()[0], training)
        b = bound.time_bound(splits, shape, dtype, tile, device.split()[0], training, {})
        assert 0 < b <= p.time * (1 + 1e-9), (tile, b, p.time)
        _levels(splits, shape, dtype, tile, device.split()[0], training)


@pytest.mark.parametrize("device", ["cpu calibrated", "L4"])
@pytest.mark.parametrize("name", ["wide field 2d", "unet 2d"])
def test_the_pruned_search_chooses_as_predicting_every_tile_on_long_grids(name, device):
    factory, shape, _ = LONG[name]
    torch.manual_seed(0)
    splits, dtype = analyse(factory().eval(), shape), DEVICES[device]
    for budget in _budgets(splits, shape, device, dtype, True)[1:]:
        pruned, skipped, _ = chosen(splits, shape, budget, device, dtype, True, False)
        every, _, _ = chosen(splits, shape, budget, device, dtype, True, True)
        assert pruned == every, (budget, pruned.tile, every.tile)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("device", ["cpu calibrated", "L4"])
@pytest.mark.parametrize("name", [*NETWORKS, *(f"long {n}" for n in LONG), "three passes"])
def test_memory_bounds_at_once_equal_one_walk_per_tile(name, device, training):
    """``memory_bound.least_memories`` (every candidate's walked tiles as rows of one walk on
    arrays) gives each tile the bound of ``predict.least_memory`` (its tiles walked one by one),
    also over the passes of global statistics (the largest pass's)."""
    if name == "three passes":
        factory, shape = (lambda: Norms(2)), (1, 2, 190, 220)
    else:
        factory, shape = NETWORKS[name] if name in NETWORKS else LONG[name.removeprefix("long ")][:2]
    splits, dtype, dev = analyse(factory().eval(), shape), DEVICES[device], device.split()[0]
    tiles = candidates(splits, shape)
    together = least_memories(splits, shape, dtype, tiles, dev, training, {})
    assert together == {t: least_memory(splits, shape, dtype, t, dev, training) for t in tiles}


@pytest.mark.parametrize("device", ["cpu calibrated", "L4"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_the_note_names_the_next_larger_tile_as_without_the_time_bound(name, device, monkeypatch):
    """The note's next larger tile and its peak (a bytes-only prediction where the time bound
    skipped it) are those of a search that predicts every candidate the time bound would skip."""
    from bigpicture.perf import search as search_module
    from bigpicture.perf.schedule import best_tile

    factory, shape = NETWORKS[name]
    splits, dtype = analyse(factory().eval(), shape), DEVICES[device]
    dev = device.split()[0]
    for budget in _budgets(splits, shape, device, dtype, True):
        pruned = best_tile(splits, shape, budget, dev, dtype, True)
        with monkeypatch.context() as patch:
            patch.setattr(search_module, "time_bound", lambda *args, **kwargs: None)
            every = best_tile(splits, shape, budget, dev, dtype, True)
        assert pruned == every.with_note(pruned.note)
        assert pruned.note.partition(";")[2] == every.note.partition(";")[2], (pruned.note, every.note)


@pytest.mark.parametrize("walks", [3, 12])
def test_a_candidate_with_too_many_kinds_of_tiles_is_skipped_and_its_error_raised_only_if_none_fits(walks,
                                                                                                    monkeypatch):  # fmt: skip
    """Output padding breaks the product rule; past ``grid.MAX_WALKS`` kinds of tiles a grid is a
    ``TilingError`` (``grid._listed``). The search treats such a candidate as not fitting: it chooses
    the fastest of the others that fit, and raises that error only where none does."""
    from test_grid_empty import OutputPadding

    from bigpicture.errors import TilingError
    from bigpicture.perf import grid
    from bigpicture.perf.schedule import best_tile

    shape = (1, 1, 61, 49)
    splits = analyse(OutputPadding().eval(), shape)
    tiles = candidates(splits, shape)
    peaks = {t: predict_splits(splits, shape, torch.float32, t, "cpu", True).memory for t in tiles}
    monkeypatch.setattr(grid, "MAX_WALKS", walks)
    grid._CLASSES.clear()
    known = {}
    for t in tiles:
        try:
            known[t] = predict_splits(splits, shape, torch.float32, t, "cpu", True)
        except TilingError:
            pass
    assert 0 < len(known) < len(tiles)
    for budget in sorted(set(peaks.values())):
        fits = [p for p in known.values() if p.memory <= budget]
        if not fits:
            with pytest.raises(TilingError, match="kinds of tiles"):
                best_tile(splits, shape, budget, "cpu", torch.float32, True)
            continue
        want = min(fits, key=lambda p: (p.time, -math.prod(p.tile)))
        got = best_tile(splits, shape, budget, "cpu", torch.float32, True)
        assert got == want.with_note(got.note), (budget, got.tile, want.tile)
    grid._CLASSES.clear()
