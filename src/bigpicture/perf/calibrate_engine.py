"""The tile interpreter's own cost, measured: tiled runs of small networks minus what the measured
op rates give their ops (``calibrate.measure`` calls it)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bigpicture.engine import execute
from bigpicture.engine.batchnorm import freeze_batchnorm
from bigpicture.engine.plan import capture, plan_graph
from bigpicture.perf.devices import get_device
from bigpicture.perf.grid import layout
from bigpicture.perf.predict import _predict_pass
from bigpicture.perf.rates import Rates


def _reference(nd: int) -> torch.nn.Module:
    """A small network with the nodes real ones have (3x3 convolutions padded at the image border,
    strided and transposed ones, normalisation, activations, pooling, a residual addition and a
    concatenation) and few channels, so that the tile interpreter's own cost dominates its run."""
    from torch import nn

    conv, norm = (nn.Conv2d, nn.Conv3d)[nd - 2], (nn.BatchNorm2d, nn.BatchNorm3d)[nd - 2]
    pool, up = (nn.MaxPool2d, nn.MaxPool3d)[nd - 2], (nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 2]

    class Reference(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(conv(1, 2, 3, padding=1), norm(2), nn.ReLU())
            self.block = nn.Sequential(
                conv(2, 2, 3, padding=1), norm(2), nn.PReLU(), conv(2, 2, 3, padding=1)
            )
            self.down = nn.Sequential(conv(2, 2, 3, 2, 1), norm(2), nn.ReLU())
            self.pool = pool(3, 2, 1)
            self.up = up(2, 2, 3, 2, 1, output_padding=1)
            self.head = conv(6, 2, 1)

        def forward(self, x):
            y = self.stem(x)
            y = torch.relu(y + self.block(y))
            z = self.up(self.down(y) + self.pool(y))
            return self.head(torch.cat([y, z, y * z], 1))

    torch.manual_seed(0)
    return Reference()


def _blocks() -> torch.nn.Module:
    """Convolutions with normalisation, activations, a residual addition and pooling at the channel
    counts of real networks: the reference for what each op that runs on every thread adds in a
    tiled run over its rate measured back to back (the idle threads it wakes, and waits for)."""
    from torch import nn

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.down = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
            conv = nn.Conv2d(32, 32, 3, padding=1)
            self.block = nn.Sequential(conv, nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
            self.pool = nn.MaxPool2d(3, 2, 1)

        def forward(self, x):
            y = self.down(self.stem(x))
            return self.pool(torch.relu(y + self.block(y)))

    torch.manual_seed(0)
    return Blocks()


def engine_costs(
    quick: bool, clock: Callable[[], float], ops: dict, dtype: torch.dtype
) -> tuple[float, float, float]:
    """Seconds per node per tile of the tile interpreter itself (the Python code around each op:
    boxes, padding at the image border, slicing, dispatch), without and with autograd: tiled runs
    of a small network (`_reference`) minus what the rates just measured (`ops`) give its ops. The
    training step runs as the engine runs it: a forward, the recompute of every tile but the last,
    a backward. The 2D and 3D networks' figures are averaged.

    The interpreter's own cost is measured on one thread (``torch.set_num_threads(1)`` for those
    runs): its Python is serial, and on more threads the tiny ops of the reference network still
    open parallel regions (convolutions and pooling always do), whose cost would be counted per node.

    Third, the seconds each op that runs on every thread (``steps``: convolutions and pooling, and
    elementwise ops over ``PARALLEL_ELEMENTS``) adds in a tiled run over the same op run back to back:
    the idle OpenMP threads it wakes after the interpreter's Python and waits for at its end. Tens of
    microseconds on an idle machine; milliseconds where any other process, even at nice 19, holds a
    core the sleeping threads must take back (measured here: a 2-thread tiled ResNet step took 3.4x
    its 1-thread time while two niced jobs ran, a ReLU 2.1 ms against 0.16 ms). Measured as an A/B at
    one moment (``_in_situ``): the network of ``_blocks`` on tiles whose ops run on every thread,
    alternated with the very aten calls of one of its steps replayed back to back; the median of the
    differences, less its nodes' interpreter cost, per op. Both sides run in the same seconds, so the
    host's speed, which swings by a quarter for minutes at a time, cancels (measured against rates
    timed minutes earlier, the figure swung 49-280 us between calibrations of one idle machine).
    Both run under the host heap's policy (``engine.host_heap``): with glibc's default one, the
    tiled run's pages freed between tiles and faulted in again would count here too."""
    rates = Rates(
        get_device("cpu"), dtype, {"ops": {**ops, "engine_node_s": 0.0, "engine_train_node_s": 0.0}}
    )

    def unit_times(split, shape, tile: int, training: bool) -> dict:
        """Predicted seconds with unit costs: {(node_s, train_node_s, wake_s): s}."""
        times, lay = {}, layout(split, shape, tile)
        for costs in ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 2.0, 0.0), (0.0, 0.0, 1.0)):
            rates.node_s, rates.train_node_s, rates.wake_s = costs
            times[costs] = _predict_pass(
                split, shape, dtype, lay, rates.device, rates, training, False, True
            ).time
        rates.node_s = rates.train_node_s = rates.wake_s = 0.0
        return times

    def run(nd: int, side: int, tile: int, training: bool) -> tuple[float, float, dict]:
        """Measured seconds, of which in its ops, and predicted ones with unit costs."""
        shape = (1, 1) + (side,) * nd
        model = _reference(nd).to(dtype)
        model = freeze_batchnorm(model.train()) if training else model.eval()
        net, split = _tiled(model, shape, dtype, tile)
        x = torch.randn(shape, dtype=dtype)
        measured, in_ops = _best_step(net, model, x, training, clock, 3 if quick else 7)
        return measured, in_ops, unit_times(split, shape, tile, training)

    zero, node, grad, wake = (0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 2.0, 0.0), (0.0, 0.0, 1.0)
    forward, train, threads = [], [], torch.get_num_threads()
    torch.set_num_threads(1)  # the interpreter's Python alone: no parallel regions (see above)
    for nd, side, tile in ((2, 32, 16),) if quick else ((2, 64, 16), (3, 16, 8)):
        left, nodes = {}, {}
        for training in (False, True):
            # what the step spends outside its ops, timed one by one (the ops' rates measured on
            # all threads would be a guess for one thread's)
            measured, in_ops, times = run(nd, side, tile, training)
            left[training] = measured - in_ops
            # nodes run without autograd; twice the nodes run with autograd (their forward and backward)
            nodes[training] = (times[node] - times[zero], times[grad] - times[zero])
        node_s = max(left[False], 0.0) / nodes[False][0]
        forward.append(node_s)
        no_grad, with_grad = nodes[True]
        train.append(2 * max(left[True] - node_s * no_grad, 0.0) / with_grad if with_grad else node_s)
    torch.set_num_threads(threads)
    node_s = sum(forward) / len(forward)
    wake_s = 0.0
    if threads > 1 and not quick:
        # 16-32 channels x 48^2 or more > PARALLEL_ELEMENTS: every op runs on every thread
        shape, tile = (1, 3, 384, 384), 192
        net, split = _tiled(_blocks().to(dtype).eval(), shape, dtype, tile)
        times = unit_times(split, shape, tile, False)
        extra = _in_situ(net, torch.randn(shape, dtype=dtype), clock, 21)
        parallel_ops = times[wake] - times[zero]
        wake_s = max(extra - node_s * (times[node] - times[zero]), 0.0) / max(parallel_ops, 1)
    return node_s, sum(train) / len(train), wake_s


def _tiled(model: torch.nn.Module, shape, dtype: torch.dtype, tile: int):
    """``model`` run by the tile interpreter as ``bp.tiled(model, tile=tile)`` runs it, and its split."""
    plan = plan_graph(capture(model), [(shape, dtype, torch.device("cpu"))], tile)
    params = list(model.parameters())
    return (lambda x: execute.run(plan, (x,), params, torch.device("cpu"))), plan.split


def _best_step(
    net, model, x: torch.Tensor, training: bool, clock: Callable[[], float], repeats: int
) -> float:
    """Best time of a tiled inference, or training step, after a first call that plans, and the
    best time its aten ops take, each timed on its own (``_OpClock``) in as many more steps."""

    def step() -> None:
        if training:
            model.zero_grad(set_to_none=True)
            net(x).sum().backward()
        else:
            with torch.no_grad():
                net(x)

    step()
    times, in_ops = [], []
    for _ in range(repeats):
        start = clock()
        step()
        times.append(clock() - start)
    for _ in range(repeats):
        with _OpClock(clock) as ops:
            step()
        in_ops.append(ops.seconds)
    return min(times), min(in_ops)


def _in_situ(net, x: torch.Tensor, clock: Callable[[], float], repeats: int) -> float:
    """Seconds one tiled inference ``net(x)`` takes over its own aten calls replayed back to back
    (the same calls on the same tensors, recorded from one step): the median of ``repeats``
    differences, each of a tiled step and a replay run one after the other."""
    with torch.no_grad():
        net(x)  # plans
        with _Recorder() as rec:
            net(x)

        def replay() -> None:
            for func, args, kwargs in rec.calls:
                func(*args, **kwargs)

        replay()
        differences = []
        for _ in range(repeats):
            start = clock()
            net(x)
            middle = clock()
            replay()
            differences.append((middle - start) - (clock() - middle))
    return statistics.median(differences)


class _Recorder(TorchDispatchMode):
    """The aten calls of a run, with their arguments, to replay."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, args, kwargs or {}))
        return out


class _OpClock(TorchDispatchMode):
    """Seconds spent inside aten ops (forward and backward), each call timed on its own."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self.clock, self.seconds = clock, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = self.clock()
        out = func(*args, **(kwargs or {}))
        self.seconds += self.clock() - start
        return out
