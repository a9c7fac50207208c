"""Planning counts tiles per dimension: the prediction equals walking every tile, with far fewer walks.

The reference below is the definition of a prediction: every tile of the plan walked on its own
(``walk.walk``), times and work summed, the largest peak kept. The planner's counting
(``classes.aggregate``: per-node geometries per dimension, classes of one structure walked together
on arrays) must give the same numbers, on a table of networks, sizes and tiles that touch every
border, with deep strides and tiles smaller than them.
"""

import math

import pytest
import torch
from torch import nn

import bigpicture as bp
from bigpicture.engine import regions
from bigpicture.engine.box import Box
from bigpicture.engine.tiles import Tiles
from bigpicture.perf import bytes_only, classes, steps, walk
from bigpicture.perf.devices import get_device
from bigpicture.perf.grid import class_grid, layout
from bigpicture.perf.predict import predict_splits
from bigpicture.perf.rates import Rates
from bigpicture.perf.schedule import analyse, best_tile


@pytest.fixture(autouse=True)
def _uncalibrated(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))


def unet2d():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3, padding=1)
            self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
            self.deep = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
            self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
            self.up2 = nn.Upsample(scale_factor=2)
            self.out = nn.Conv2d(8, 2, 3, padding=1)

        def forward(self, x):
            a = torch.relu(self.a(x))
            d = self.down(a)
            u = self.up2(self.up(self.deep(d)) + d)
            return self.out(torch.cat([u, a], 1))

    return Net()


CASES = {
    "chain 2d": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 2, 5, padding=2)
        ),
        (1, 1, 61, 47),
        [6, 10, 16],
    ),
    "unet 2d": (unet2d, (1, 1, 52, 44), [4, 8, 12, 20]),
    "pad and classifier 2d": (
        lambda: nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(1, 4, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3),
            nn.AdaptiveAvgPool2d(1),
        ),
        (1, 1, 70, 54),
        [8, 12, 24],
    ),
    "3d": (
        lambda: nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.MaxPool3d(2), nn.Conv3d(2, 2, 3, padding=1)),
        (1, 1, 22, 18, 26),
        [4, 6, 10],
    ),
}


def reference(split, shape, dtype, tile, rates, training, copy):
    """Every tile walked on its own: summed times and work, the largest peaks."""
    lay = layout(split, shape, tile)
    total, n = walk.TileWalk(), 0
    for t in Tiles.of(split, lay):
        need = regions.needs(split, dict(zip(split.sinks, t.writes, strict=True)))
        total.add(walk.walk(split, need, t.writes, dtype, rates, training, False, copy), 1)
        n += 1
    return total, n


def calibrated() -> Rates:
    """CPU rates from a calibration whose convolutions differ by backend and size: torch picks the
    backend by the shape of a tile's input, so steps of one size but other shapes differ."""
    conv = [
        {"nd": nd, "cin": c, "cout": o, "kernel": k, "fan_in": c * k, "positions": p, "stride": 1,
         "transposed": False, "backend": b, "forward": f * c * o * p, "backward": f * c * o * p / 3,
         "backward_weight": f * c * o * p / 2}
        for nd, b, f in ((2, "Mkldnn", 1e3), (2, "Slow2d", 7e2), (3, "Slow3d", 5e2), (3, "Mkldnn", 9e2))
        for c in (1, 4) for o in (2, 4) for p in (16, 4096) for k in (9, 25, 27)
    ]  # fmt: skip
    stream = {k: [[1, 1e8], [2**20, 4e9], [2**30, 2e9]] for k in ("unary", "binary", "norm", "copy")}
    ops = {"dtype": "float32", "conv": conv, "stream": stream, "engine_node_s": 1e-5, "wake_s": 1e-6,
           "engine_train_node_s": 3e-5, "pool": {"forward": [[1, 1e8], [2**20, 1e9]], "backward": [[1, 1e8]]}}  # fmt: skip
    return Rates(get_device("cpu"), torch.float32, {"ops": ops})


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("device", ["cpu", "cpu calibrated", "H100-SXM"])
@pytest.mark.parametrize("name", list(CASES))
def test_counting_per_dimension_equals_walking_every_tile(name, device, training):
    make, shape, tiles = CASES[name]
    net = make().eval()
    split = analyse(net, shape)[-1]
    rates = calibrated() if device == "cpu calibrated" else Rates(get_device(device), torch.float32)
    assert rates.measured == (device == "cpu calibrated")
    for tile in tiles:
        cg = class_grid(split, layout(split, shape, tile))
        for copy in (True, False):
            got = classes.aggregate(split, cg, torch.float32, rates, training, False, copy, {})
            want, n = reference(split, shape, torch.float32, tile, rates, training, copy)
            assert cg.tiles == n
            assert (got.peak, got.peak_train) == (want.peak, want.peak_train), (name, tile, copy)
            assert (got.flops_fwd, got.flops_bwd, got.nodes, got.ops) == (
                want.flops_fwd,
                want.flops_bwd,
                want.nodes,
                want.ops,
            )
            assert got.fwd_s == pytest.approx(want.fwd_s, rel=1e-12)
            assert got.bwd_s == pytest.approx(want.bwd_s, rel=1e-12)
            for kind in set(got.fwd_by_kind) | set(want.fwd_by_kind):
                assert got.fwd_by_kind[kind] == pytest.approx(want.fwd_by_kind[kind], rel=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_classes_walked_a_few_rows_at_a_time_peak_the_same(name, monkeypatch):
    """``walk.row_peaks`` walks the classes of a structure in chunks (big grids would otherwise hold
    every class's byte counts of every node at once): chunks of 2 rows give every tile's peak."""
    monkeypatch.setattr(walk, "CHUNK_ROWS", 2)
    make, shape, tiles = CASES[name]
    split = analyse(make().eval(), shape)[-1]
    rates = Rates(get_device("H100-SXM"), torch.float32)
    for tile in tiles:
        cg = class_grid(split, layout(split, shape, tile))
        got = classes.aggregate(split, cg, torch.float32, rates, True, False, True, {})
        want, _ = reference(split, shape, torch.float32, tile, rates, True, True)
        assert (got.peak, got.peak_train) == (want.peak, want.peak_train), (name, tile)


@pytest.mark.parametrize("device", ["cpu", "cpu calibrated", "H100-SXM"])
@pytest.mark.parametrize("name", list(CASES))
def test_bytes_only_predictions_have_the_memory_of_full_ones(name, device):
    """When no tile fits, the planner predicts candidates with byte-counting rates
    (``search.least_prediction``): their memory, parts and all, must be the full prediction's."""
    make, shape, tiles = CASES[name]
    splits = analyse(make().eval(), shape)
    rates = calibrated() if device == "cpu calibrated" else Rates(get_device(device), torch.float32)
    for tile in tiles:
        for training in (False, True):
            full = predict_splits(splits, shape, torch.float32, tile, device.split()[0], training,
                                  shared={"rates": rates})  # fmt: skip
            counted = predict_splits(splits, shape, torch.float32, tile, device.split()[0], training,
                                     shared={"rates": bytes_only.bytes_only(rates)})  # fmt: skip
            assert counted.memory == full.memory and counted.memory_parts == full.memory_parts, tile


def test_steps_are_built_per_geometry_and_walks_per_structure(monkeypatch):
    """1.7 million tiles in 216 classes: the steps built are one per geometry of a node (per
    dimension, combined), and the walks one per structure (which borders a tile touches), not
    one per class."""
    net = nn.Sequential(
        nn.Conv3d(1, 2, 5, padding=2),
        nn.MaxPool3d(2),
        nn.Conv3d(2, 2, 5, padding=2),
        nn.MaxPool3d(2),
        nn.Conv3d(2, 2, 5, padding=2),
        nn.Upsample(scale_factor=4),
        nn.Conv3d(2, 1, 3, padding=1),
    ).eval()
    shape = (1, 1, 480, 480, 480)
    split = analyse(net, shape)[-1]
    built, walks = [], []
    real_steps, real_peaks = steps.steps_of, walk.peaks

    def counted_steps(split, node, rows, *a, **k):
        built.append(len(rows.numel))
        return real_steps(split, node, rows, *a, **k)

    monkeypatch.setattr(steps, "steps_of", counted_steps)
    monkeypatch.setattr(classes, "steps_of", counted_steps)
    monkeypatch.setattr(walk, "peaks", lambda *a, **k: walks.append(1) or real_peaks(*a, **k))
    p = predict_splits([split], shape, torch.float32, 4, "H100-SXM", training=True)
    cg = class_grid(split, layout(split, shape, 4))
    assert p.tiles == 120**3 and p.classes == math.prod(len(k) for k in cg.per_dim) == 6**3
    grid = classes._Grid(split, cg)
    nodes = [n for n in split.order if n in split.ops]
    geometries = sum(
        math.prod(len(f[1]) for f in grid.features(lambda j, d, n=n: steps.dim_geometry(
            split, n, grid.row(j)[1], steps._stored(split, steps.spatial_inputs(split, n, grid.row(j)[1]),
                                                    grid.row(j)[1], True), d
        ))) for n in nodes
    )  # fmt: skip
    assert sum(built) <= geometries + 2 * len(nodes) < p.classes * len(nodes) // 2  # + the untiled, last tile
    assert len(walks) <= 3**3 + 2 < p.classes  # + the untiled, last tile


def test_a_plan_of_millions_of_tiles_makes_them_on_demand():
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv3d(2, 1, 3, padding=1)).eval()
    plan = bp.make_plan(net, (1, 1, 2048, 2048, 2048), tile=8)
    assert len(plan.tiles) == 256**3 and plan.grid == (256, 256, 256)
    assert plan.halo == ((2, 2),) * 3
    last = plan.tiles[-1]
    assert last.index == (255, 255, 255) and last.read == Box((2038,) * 3, (2048,) * 3)
    assert plan.tiles[::-1][0] == last and len(plan.tiles[10:20]) == 10
    assert len(plan.tiles.diagonal.rows) == 256  # one walk per diagonal tile, not per tile


def _network(nd: int, classifier: bool) -> nn.Module:
    conv, pool = (nn.Conv2d, nn.MaxPool2d) if nd == 2 else (nn.Conv3d, nn.MaxPool3d)
    layers = [conv(1, 4, 5, padding=2), nn.ReLU(), pool(2), conv(4, 8, 3, padding=1), nn.ReLU(), pool(2)]
    layers.append(conv(8, 8, 3, padding=1))
    if classifier:
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1) if nd == 2 else nn.AdaptiveAvgPool3d(1),
                             nn.Flatten(), nn.Linear(8, 2)).eval()  # fmt: skip
    return nn.Sequential(*layers, nn.Upsample(scale_factor=4), conv(8, 2, 3, padding=1)).eval()


SIZES = {2: (2**13, 2**15, 2**17), 3: (512, 1024, 2048)}  # up to beyond 100,000^2 and 2048^3


@pytest.fixture
def counted(monkeypatch):
    """Counts of reverse walks (``regions.needs``: one per tile walked or diagonal row visited) and
    of steps built (rows of ``steps.steps_of``), reset by the test."""
    from bigpicture.engine import tiles as engine_tiles
    from bigpicture.perf import grid as perf_grid

    counts = {"needs": 0, "steps": 0}
    real_needs, real_steps = regions.needs, steps.steps_of

    def counted_needs(*a, **k):
        counts["needs"] += 1
        return real_needs(*a, **k)

    def counted_steps(split, node, rows, *a, **k):
        counts["steps"] += len(rows.numel)
        return real_steps(split, node, rows, *a, **k)

    for module in (engine_tiles, perf_grid, walk):
        monkeypatch.setattr(module, "needs", counted_needs)
    monkeypatch.setattr(classes, "steps_of", counted_steps)
    monkeypatch.setattr(steps, "steps_of", counted_steps)
    perf_grid._CLASSES.clear()
    return counts


@pytest.mark.parametrize("classifier", [False, True], ids=["dense", "classifier"])
@pytest.mark.parametrize("nd, tile", [(2, 256), (3, 32)])
def test_a_prediction_does_not_grow_with_the_grid(nd, tile, classifier, counted):
    """One tile size, images 16x (2D) and 4x (3D) apart: grids of 16 to 512 tiles per dimension,
    the same walks and steps (the interior tiles are one class, the borders a few)."""
    work = []
    for size in SIZES[nd]:
        shape = (1, 1) + (size,) * nd
        splits = analyse(_network(nd, classifier), shape)
        counted.update(needs=0, steps=0)
        p = predict_splits(splits, shape, torch.bfloat16, tile, "H100-SXM", training=True)
        assert p.tiles == (size // tile) ** nd
        work.append(dict(counted))
    assert work[0] == work[1] == work[2], work


@pytest.mark.parametrize("budget", ["80GiB", "4GiB"])
@pytest.mark.parametrize("classifier", [False, True], ids=["dense", "classifier"])
@pytest.mark.parametrize("nd", [2, 3])
def test_the_planners_search_is_bounded_whatever_the_input_size(nd, classifier, budget, counted):
    """The whole search (candidates from the whole image down to MAX_TILES tiles, each bounded by
    its memory from one walk, pruned by time bounds) walks and builds at most a constant of the network's,
    at input sizes up to 2^17 px square and 2048^3 voxels."""
    chosen = []
    for size in SIZES[nd]:
        shape = (1, 1) + (size,) * nd
        splits = analyse(_network(nd, classifier), shape)
        counted.update(needs=0, steps=0)
        try:
            p = best_tile(splits, shape, budget, "H100-SXM", torch.bfloat16, training=True)
            chosen.append((p.tile, p.tiles))
        except bp.TilingError as e:  # the dense output alone is over the budget: a result too
            assert "no tile fits" in str(e)
            chosen.append(None)
        # each candidate: a walk for its memory bound, the diagonal rows of its time bound
        assert counted["needs"] <= 192 and counted["steps"] <= 640, (size, counted, chosen)
    assert any(c is not None and c[1] > 1 for c in chosen) or not classifier, chosen  # tiles were chosen


@pytest.mark.parametrize("device", ["cpu", "cpu calibrated", "H100-SXM"])
def test_stream_rates_on_arrays_equal_the_scalar_ones(device):
    """``Rates.streams`` (the steps on arrays) is ``Rates.stream`` at every entry, below, inside
    and beyond the calibrated sizes, forward and backward."""
    import numpy as np

    rates = calibrated() if device == "cpu calibrated" else Rates(get_device(device), torch.float32)
    sizes = np.array([1, 2, 1000, 2**20, 2**20 + 1, 3 * 2**25, 2**30, 2**34], dtype=np.int64)
    for kind in ("unary", "copy", "norm", "prelu"):
        for backward in (False, True):
            got = rates.streams(kind, sizes, backward)
            want = [rates.stream(kind, int(n), backward) for n in sizes]
            assert got.tolist() == pytest.approx(want, rel=1e-12)


def _padded_net():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pad = nn.ReflectionPad2d(2)
            self.a = nn.Conv2d(1, 4, 5)
            self.pool = nn.MaxPool2d(2)
            self.avg = nn.AvgPool2d(3, 1, 1)
            self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
            self.out = nn.Conv2d(8, 2, 3, padding=1)

        def forward(self, x):
            a = torch.relu(self.a(self.pad(x)))
            u = self.up(self.avg(self.pool(a)))
            return self.out(torch.cat([u, a], 1))

    return Net().eval()


@pytest.mark.parametrize("device", ["cpu", "cpu calibrated", "H100-SXM"])
def test_steps_on_arrays_equal_steps_built_one_at_a_time(device):
    """``steps.steps_of`` on the geometries of every tile at once (rows mixing border and interior
    tiles, padded copies and none, a reflection pad that is a view inside the image and a copy at
    its border) gives, row by row, the step built for that tile alone (``steps._step``)."""
    import numpy as np

    shape = (1, 1, 40, 36)
    split = analyse(_padded_net(), shape)[-1]
    rates = calibrated() if device == "cpu calibrated" else Rates(get_device(device), torch.float32)
    tiles = Tiles.of(split, layout(split, shape, 8))
    needs = [regions.needs(split, dict(zip(split.sinks, t.writes, strict=True))) for t in tiles]
    kinds = set()
    for node in (n for n in split.order if n in split.ops):
        op, singles, parts = split.ops[node], [], []
        for need in needs:
            stored = steps._stored(split, steps.spatial_inputs(split, node, need), need, True)
            key = steps.step_key(node, steps.geometries(split, node, need, stored), True)
            copied = key[1] or key[2]
            singles.append(steps._step(split, node, need[node], copied, need, 4, rates, True))
            parts.append((need, copied))
        box = [need[node] for need, _ in parts]
        dims = [
            [op.padded_box(b).shape if isinstance(op, steps.Window) else (1, 1) for b in box],
            [op.needs(b)[0].shape if isinstance(op, steps.ConvTranspose) else (1, 1) for b in box],
        ]  # fmt: skip
        rows = steps.Rows(
            np.array([b.numel for b in box]),
            tuple((i, np.array([need[i].numel for need, _ in parts])) for i in op.inputs if i in needs[0]),
            np.array(dims[0]),
            np.array(dims[1]),
            np.array([c and steps._outside(op, b) for (_, c), b in zip(parts, box, strict=True)]),
            np.array([c for _, c in parts]),
        )
        batch = steps.steps_of(split, node, rows, 4, rates, True)
        for i, single in enumerate(singles):
            assert steps.row(batch, i) == single, (node, i)
            kinds.add((single.kind, single.keeps_padded, single.aliases))
    assert {k for k, _, _ in kinds} >= {"conv", "pool", "copy", "view", "unary"}
    assert any(keeps for _, keeps, _ in kinds) and any(alias for _, _, alias in kinds)
