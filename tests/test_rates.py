"""Convolution rates of a calibrated CPU: torch's backend per shape, the grid interpolation."""

import math
import resource

import pytest
import torch
from torch import nn

import bigpicture as bp
from bigpicture.perf.conv_rates import conv_backend
from bigpicture.perf.devices import local_cpu
from bigpicture.perf.grid import layout
from bigpicture.perf.predict import _predict_pass
from bigpicture.perf.rate_tables import _grid_rate
from bigpicture.perf.rates import PARALLEL_ELEMENTS, Rates
from bigpicture.perf.steps import node_step
from bigpicture.perf.walk import grads, tile_at


def _select(x_shape, w_shape, stride=1, transposed=False):
    nd = len(x_shape) - 2
    x, w = torch.zeros(x_shape), torch.zeros(w_shape)
    backend = torch._C._select_conv_backend(
        x, w, None, [stride] * nd, [0] * nd, [1] * nd, transposed, [0] * nd, 1, None
    )
    return str(backend).rsplit(".", 1)[-1]


CASES = {  # name: (input shape, weight shape, stride, transposed)
    "2d few channels": ((1, 3, 34, 34), (8, 3, 3, 3), 1, False),
    "2d wide": ((1, 32, 66, 66), (32, 32, 3, 3), 1, False),
    "2d 1x1": ((1, 16, 20, 20), (16, 16, 1, 1), 1, False),
    "2d strided stem": ((1, 3, 229, 229), (16, 3, 7, 7), 2, False),
    "3d small": ((1, 16, 34, 34, 34), (16, 16, 3, 3, 3), 1, False),
    "3d large": ((1, 16, 50, 50, 50), (16, 16, 3, 3, 3), 1, False),
    "3d transposed": ((1, 16, 8, 8, 8), (16, 8, 2, 2, 2), 2, True),
}


@pytest.mark.parametrize("case", CASES)
def test_conv_backend_is_torchs_choice(case):
    x_shape, w_shape, stride, transposed = CASES[case]
    nd = len(x_shape) - 2
    got = conv_backend(x_shape, w_shape, (stride,) * nd, (1,) * nd, 1, transposed)
    assert got == _select(x_shape, w_shape, stride, transposed)


def test_conv_backend_switches_with_size_and_allocates_nothing():
    # torch runs a small 3D convolution as im2col + GEMM, a large one with oneDNN: rates jump there
    small = conv_backend((1, 16, 34, 34, 34), (16, 16, 3, 3, 3), (1,) * 3, (1,) * 3, 1, False)
    large = conv_backend((1, 16, 50, 50, 50), (16, 16, 3, 3, 3), (1,) * 3, (1,) * 3, 1, False)
    assert small != large
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    huge = conv_backend((1, 64, 100_000, 100_000), (64, 64, 3, 3), (1, 1), (1, 1), 1, False)
    assert huge is not None  # 2.4 TiB of input, asked of torch's heuristic without allocating it
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def _point(cin, cout, positions, rate, kernel=9, stride=1, backend="Mkldnn", nd=2):
    return {"nd": nd, "cin": cin, "cout": cout, "kernel": kernel, "fan_in": cin * kernel, "positions": positions,
            "stride": stride, "transposed": False, "backend": backend, "forward": rate, "backward": rate / 2}  # fmt: skip


GRID = [_point(c, o, p, 1e9 * c * o * p / 64) for c in (8, 32) for o in (8, 32) for p in (256, 4096)]


def test_grid_rate_is_exact_on_the_grid_and_geometric_between():
    for p in GRID:
        assert _grid_rate(GRID, "forward", p["cin"], p["cout"], p["positions"], 1, 9, None) == pytest.approx(
            p["forward"]
        )
    # the rate is a product of powers of the axes: multilinear in logs is exact for it
    at = (16, 8, 1024)
    want = 1e9 * math.prod(at) / 64
    assert _grid_rate(GRID, "forward", *at, 1, 9, None) == pytest.approx(want)
    assert _grid_rate(GRID, "backward", *at, 1, 9, None) == pytest.approx(want / 2)
    # beyond the grid: the nearest edge
    assert _grid_rate(GRID, "forward", 4, 8, 256, 1, 9, None) == pytest.approx(GRID[0]["forward"])


def test_grid_rate_keeps_to_the_backend_kernel_and_stride_measured():
    slow = [{**p, "backend": "Slow2d", "forward": p["forward"] / 10} for p in GRID]
    ones = [{**p, "kernel": 1, "fan_in": p["cin"], "forward": 7.0} for p in GRID]
    strided = [{**p, "stride": 2, "forward": 3.0} for p in GRID]
    points = GRID + slow + ones + strided
    fast = _grid_rate(points, "forward", 8, 8, 256, 1, 9, "Mkldnn")
    assert fast == pytest.approx(GRID[0]["forward"])
    assert _grid_rate(points, "forward", 8, 8, 256, 1, 9, "Slow2d") == pytest.approx(fast / 10)
    assert _grid_rate(points, "forward", 8, 8, 256, 1, 1, "Mkldnn") == pytest.approx(7.0)
    assert _grid_rate(points, "forward", 8, 8, 256, 2, 9, "Mkldnn") == pytest.approx(3.0)
    # a backend never measured: every backend's points; a 5x5 kernel: the nearer 3x3 ones
    assert _grid_rate(points, "forward", 8, 8, 256, 1, 25, "Winograd") > 0
    assert _grid_rate(GRID + ones, "forward", 8, 8, 256, 1, 25, None) == pytest.approx(fast)
    # a corner the grid skipped leaves the weights, not a zero rate
    holes = [p for p in GRID if (p["cin"], p["cout"], p["positions"]) != (32, 32, 4096)]
    assert _grid_rate(holes, "forward", 16, 16, 1024, 1, 9, None) > 0


@pytest.mark.parametrize("nd", [2, 3])
def test_a_first_layers_backward_runs_at_the_weights_gradient_rate(nd):
    """A convolution whose input needs no gradient (a network's first layer on the image) computes the
    weights' gradient alone: its backward is its forward's flops at the calibration's
    ``backward_weight`` rate (the whole grid 3x the full backward's here: a third of the seconds), and
    with the input's gradient too, twice the flops at the full rate, as a calibration without
    ``backward_weight`` predicts both (the full rate for the weights alone)."""
    conv = (nn.Conv2d, nn.Conv3d)[nd - 2]
    model = conv(3, 8, 3, padding=1).train()
    x_shape = (1, 3) + (40,) * nd
    plan = bp.make_plan(model, x_shape, tile=16)
    one = [_point(c, o, p, 1e10 * c * o / p**0.5, kernel=3**nd, backend=b, nd=nd) for c in (2, 8)
           for o in (4, 8) for p in (256, 4096) for b in ("Slow2d", "Mkldnn", "Slow3d")]  # fmt: skip
    apart = [{**p, "backward_weight": 3 * p["backward"]} for p in one]
    # memory-bound ops, the gradient sums and the engine take no time here
    stream = {k: [[1, 1e30], [2**30, 1e30]] for k in ("unary", "binary", "norm", "copy")}
    base = {"dtype": "float32", "stream": stream, "pool": {"forward": [[1, 1e9]], "backward": [[1, 1e9]]},
            "engine_node_s": 0.0, "engine_train_node_s": 0.0}  # fmt: skip

    def backward(points, input_grad):
        rates = Rates(local_cpu(), torch.float32, {"ops": {**base, "conv": points}})
        lay = layout(plan.split, x_shape, 16)
        p = _predict_pass(plan.split, x_shape, torch.float32, lay, rates.device, rates, True, input_grad, True)
        return dict((s.name, s.seconds) for s in p.stages)["backward"]

    first = backward(one, False)
    assert first > 0
    assert backward(apart, False) == pytest.approx(first / 3, rel=1e-12)
    assert backward(apart, True) == backward(one, True) == pytest.approx(2 * first, rel=1e-12)


def test_prediction_uses_the_grid_of_a_calibration():
    """Two calibrations that differ only in the rate of one backend give different conv times, and
    an old calibration (no channels or backends recorded) still predicts through the nearest points."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x_shape = (1, 3, 64, 64)
    plan = bp.make_plan(model, x_shape, tile=32)
    points = [_point(c, o, p, 1e10, backend=b) for c in (2, 8) for o in (4, 8) for p in (256, 4096)
              for b in ("Slow2d", "Mkldnn")]  # fmt: skip
    # memory-bound ops (the padded copies a conv step includes) take no time here
    stream = {k: [[1, 1e30], [2**30, 1e30]] for k in ("unary", "binary", "norm", "copy")}
    base = {"dtype": "float32", "stream": stream, "pool": {"forward": [[1, 1e9]], "backward": [[1, 1e9]]},
            "engine_node_s": 0.0, "engine_train_node_s": 0.0}  # fmt: skip
    backends = {
        conv_backend((1, c, s + 2, s + 2), (8, c, 3, 3), (1, 1), (1, 1), 1, False)
        for c in (3, 8)
        for s in (32, 34)
    }
    assert backends, "torch names no backend"

    def conv_seconds(conv_points):
        rates = Rates(local_cpu(), torch.float32, {"ops": {**base, "conv": conv_points}})
        lay = layout(plan.split, x_shape, 32)
        p = _predict_pass(plan.split, x_shape, torch.float32, lay, rates.device, rates, False, False, True)
        return dict(p.by_kind)["conv"]

    slower = [{**p, "forward": p["forward"] / (10 if p["backend"] in backends else 1)} for p in points]
    assert conv_seconds(slower) == pytest.approx(10 * conv_seconds(points))
    old = [{k: v for k, v in p.items() if k not in ("cin", "kernel", "backend")} for p in points]
    assert conv_seconds(old) > 0


def _rates(wake_s: float) -> Rates:
    stream = {k: [[1, 1e10], [2**30, 1e10]] for k in ("unary", "binary", "norm", "copy")}
    ops = {"dtype": "float32", "conv": [_point(8, 8, 4096, 1e10)], "stream": stream,
           "pool": {"forward": [[1, 1e9]], "backward": [[1, 1e9]]}, "engine_node_s": 0.0,
           "engine_train_node_s": 0.0, "wake_s": wake_s}  # fmt: skip
    return Rates(local_cpu(), torch.float32, {"ops": ops})


@pytest.mark.parametrize("side, tile, parallel", [(128, 64, True), (32, 16, False)])
def test_ops_on_every_thread_pay_the_calibrated_wake(side, tile, parallel):
    """An op of at least PARALLEL_ELEMENTS elements wakes the idle threads once (OMP_WAIT_POLICY):
    a convolution and a ReLU per tile, four tiles; a smaller ReLU runs on one thread and pays
    nothing, a convolution runs on every thread at any size (``steps.ALWAYS_PARALLEL``)."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    shape = (1, 8, side, side)
    split = bp.make_plan(model, shape, tile=tile).split
    lay = layout(split, shape, tile)
    times = [
        _predict_pass(split, shape, torch.float32, lay, r.device, r, False, False, True).time
        for r in (_rates(0.0), _rates(1e-3))
    ]
    assert times[1] - times[0] == pytest.approx(4 * (2 if parallel else 1) * 1e-3, abs=1e-9)


def test_quick_calibration_records_the_wait_policy(tmp_path, monkeypatch):
    from bigpicture.perf.calibrate import calibrate

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    cal = calibrate(tmp_path / "cal.json", quick=True)
    assert cal["omp_wait_policy"] == "PASSIVE" and cal["ops"]["wake_s"] >= 0.0
    from bigpicture.engine import host_heap

    assert cal["host_heap"] == host_heap.policy()  # page faults of a tiled run depend on it
    assert all("backend" in p and "cin" in p for p in cal["ops"]["conv"])
    # the weights' gradient alone is measured apart (a first layer's backward)
    assert all(p["backward_weight"] > 0 for p in cal["ops"]["conv"])


def test_a_calibration_without_convolutions_falls_back_to_half_the_peak():
    ops = {
        "dtype": "float32",
        "conv": [],
        "stream": {},
        "pool": {},
        "engine_node_s": 0.0,
        "engine_train_node_s": 0.0,
    }
    rates = Rates(local_cpu(), torch.float32, {"ops": ops})
    assert rates.conv(2, 27, 16, 1000, cin=3, kernel=9, backend="Mkldnn") == 0.5 * rates.peak


def test_backward_of_memory_bound_ops_uses_its_own_calibration():
    """PReLU's backward (a reduction for its weight) is timed from its own table, ReLU's from its
    own; a kind without a backward table (a multiplication) falls back to the unary rate."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    model = bp.freeze_batchnorm(model.train())
    shape = (1, 3, 64, 64)
    split = bp.make_plan(model, shape, tile=32).split
    lay = layout(split, shape, 32)

    def backward_by_kind(slow_prelu: float) -> dict:
        rates = _rates(0.0)
        table = [[1, 1e10], [2**30, 1e10]]
        rates.ops["stream_backward"] = {"unary": table, "prelu": [[b, r / slow_prelu] for b, r in table]}
        p = _predict_pass(split, shape, torch.float32, lay, rates.device, rates, True, False, True)
        return dict(p.by_kind)

    fast, slow = backward_by_kind(1.0), backward_by_kind(10.0)
    assert slow["unary"] == pytest.approx(fast["unary"]) and slow["conv"] == pytest.approx(fast["conv"])
    assert slow["prelu"] > 2 * fast["prelu"] > 0  # its backward, 10x slower, outweighs its forward
    rates = _rates(0.0)
    rates.ops["stream_backward"] = {"prelu": [[1, 5.0]]}
    assert rates.stream("prelu", 1000, backward=True) == 5.0
    assert rates.stream("binary", 1000, backward=True) == rates.stream("unary", 1000)
    assert rates.stream("prelu", 1000) == rates.stream("unary", 1000)  # no forward table of its own here


def test_calibration_cycles_through_copies_that_exceed_the_caches():
    from bigpicture.perf.calibrate import COLD_BYTES, _copies, _cycling

    assert _copies(2**10) == 16 and _copies(2**10, most=8) == 8  # tiny operands: at most `most`
    assert _copies(COLD_BYTES // 4) == 4 and _copies(COLD_BYTES) == 2 == _copies(10 * COLD_BYTES)
    seen = []
    call = _cycling(lambda a, b: seen.append(a + b), [(1, 2), (3, 4)])
    for _ in range(5):
        call()
    assert seen == [3, 7, 3, 7, 3]


def test_full_grid_reaches_the_geometries_tiles_take():
    """Beyond the grid a rate is held at its last point; the full calibration measures the first and
    last layers of common networks at the sides their tiles reach: a UNet's first downsampling from
    RGB (a 384 tile: 192 wide), a 7x7 stem on a 512 tile (320 wide), a transposed convolution to 2
    classes at 192, a 2 -> 2 head in 2D and 3D; none costs more than the grid's 2 GFLOP cap."""
    from bigpicture.perf.calibration_grid import _conv_grid

    grid = _conv_grid(False)
    for point in [(2, 3, 16, 3, 2, 192, False), (2, 3, 16, 7, 2, 320, False), (2, 32, 2, 3, 2, 192, True),
                  (2, 2, 2, 3, 1, 256, False), (3, 2, 2, 3, 1, 56, False)]:  # fmt: skip
        assert point in grid
    assert all(2 * cin * cout * k**nd * side**nd <= 2e9 for nd, cin, cout, k, _, side, _ in grid)
    assert len(set(grid)) == len(grid)


def test_full_grid_measures_each_kernel_from_the_side_torch_switches_to_it():
    """Rates are interpolated within one kernel family's points and held below its smallest: every
    run of a family's sides on one kernel starts at the side where torch switches to it (a 3 -> 16
    3x3 convolution's input reaches oneDNN at 83 x 83, 3 x 83 x 83 > 20,480 elements)."""
    from bigpicture.perf.calibration_grid import _backend_at, _conv_grid

    grid = _conv_grid(False)
    assert (2, 3, 16, 3, 1, 81, False) in grid and (2, 3, 16, 3, 1, 80, False) not in grid
    sides: dict = {}
    for nd, cin, cout, k, stride, side, transposed in grid:
        sides.setdefault((nd, cin, cout, k, stride, transposed), []).append(side)
    checked = 0
    for (nd, cin, cout, k, stride, transposed), measured in sides.items():
        measured = sorted(measured)
        for a, b in zip(measured, measured[1:], strict=False):
            kernel = _backend_at(nd, cin, cout, k, stride, b, transposed)
            if kernel != _backend_at(nd, cin, cout, k, stride, a, transposed) and kernel is not None:
                assert _backend_at(nd, cin, cout, k, stride, b - 1, transposed) != kernel, (nd, cin, cout, k, b)
                checked += 1
    assert checked > 100


@pytest.mark.parametrize(
    "module, channels, side, woken",
    [
        (nn.Conv2d(2, 2, 3, padding=1), 2, 16, True),  # a convolution runs on every thread at any size
        (nn.MaxPool2d(3, 1, 1), 2, 16, True),  # so does pooling
        (nn.ReLU(), 2, 16, False),  # an elementwise op only over PARALLEL_ELEMENTS
        (nn.ReLU(), 8, 64, True),
    ],
)
def test_which_ops_wake_the_idle_threads(module, channels, side, woken):
    assert (channels * side * side >= PARALLEL_ELEMENTS) == (side == 64)
    shape = (1, channels, side, side)
    split = bp.make_plan(nn.Sequential(module).eval(), shape, tile=side).split
    need = tile_at(split, layout(split, shape, side), (0, 0))[0]
    node = list(grads(split, need, False))[1]
    steps = [node_step(split, node, need, False, False, 4, _rates(w), {}) for w in (0.0, 1e-3)]
    assert steps[1].fwd_s - steps[0].fwd_s == pytest.approx(1e-3 if woken else 0.0)
