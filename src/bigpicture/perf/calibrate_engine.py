"""The tile interpreter's own cost, measured: tiled runs of small networks minus what the measured
op rates give their ops (``calibrate.measure`` calls it)."""

from __future__ import annotations

from collections.abc import Callable

import torch

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


def _pointwise() -> torch.nn.Module:
    """Memory-bound ops only (normalisation, activations, additions, a concatenation) on 8 channels:
    the reference for what an op on every thread costs in a tiled run over its rate back to back."""
    from torch import nn

    class Pointwise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.act = nn.BatchNorm2d(8), nn.PReLU()

        def forward(self, x):
            y = torch.relu(self.norm(x))
            z = self.act(y + x)
            return torch.cat([y, z * y], 1)

    torch.manual_seed(0)
    return Pointwise()


def engine_costs(
    quick: bool, clock: Callable[[], float], ops: dict, dtype: torch.dtype
) -> tuple[float, float, float]:
    """Seconds per node per tile of the tile interpreter itself (the Python code around each op:
    boxes, padding at the image border, slicing, dispatch), without and with autograd: tiled runs
    of a small network (`_reference`) minus what the rates just measured (`ops`) give its ops. The
    training step runs as the engine runs it: a forward, the recompute of every tile but the last,
    a backward. The 2D and 3D networks' figures are averaged.

    Third, the seconds each op big enough to run on every thread adds in a tiled run over its rate
    measured back to back: the idle OpenMP threads it wakes after the interpreter's Python (tens of
    microseconds with OMP_WAIT_POLICY=PASSIVE, about nothing when they spin, the default): the 2D
    network on tiles whose ops run on every thread, minus its ops and its nodes."""
    rates = Rates(
        get_device("cpu"), dtype, {"ops": {**ops, "engine_node_s": 0.0, "engine_train_node_s": 0.0}}
    )

    def run(nd: int, side: int, tile: int, training: bool, pointwise: bool = False) -> tuple[float, dict]:
        """Measured seconds and predicted ones with unit costs: {(node_s, train_node_s, wake_s): s}."""
        shape = (1, 8 if pointwise else 1) + (side,) * nd
        model = (_pointwise() if pointwise else _reference(nd)).to(dtype)
        model = freeze_batchnorm(model.train()) if training else model.eval()
        net, split = _tiled(model, shape, dtype, tile)
        measured = _best_step(net, model, torch.randn(shape, dtype=dtype), training, clock, 3 if quick else 7)
        lay = layout(split, shape, tile)
        times = {}
        for costs in ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 2.0, 0.0), (0.0, 0.0, 1.0)):
            rates.node_s, rates.train_node_s, rates.wake_s = costs
            times[costs] = _predict_pass(
                split, shape, dtype, lay, rates.device, rates, training, False, True
            ).time
        rates.node_s = rates.train_node_s = rates.wake_s = 0.0
        return measured, times

    zero, node, grad, wake = (0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 2.0, 0.0), (0.0, 0.0, 1.0)
    forward, train = [], []
    for nd, side, tile in ((2, 32, 16),) if quick else ((2, 64, 16), (3, 16, 8)):
        left, nodes = {}, {}
        for training in (False, True):
            measured, times = run(nd, side, tile, training)
            left[training] = measured - times[zero]
            # nodes run without autograd; twice the nodes run with autograd (their forward and backward)
            nodes[training] = (times[node] - times[zero], times[grad] - times[zero])
        node_s = max(left[False], 0.0) / nodes[False][0]
        forward.append(node_s)
        no_grad, with_grad = nodes[True]
        train.append(2 * max(left[True] - node_s * no_grad, 0.0) / with_grad if with_grad else node_s)
    node_s = sum(forward) / len(forward)
    wake_s = 0.0
    if torch.get_num_threads() > 1 and not quick:
        # 8 channels x 96^2 > PARALLEL_ELEMENTS: every op runs on every thread
        measured, times = run(2, 384, 96, False, pointwise=True)
        parallel_ops = times[wake] - times[zero]
        left = measured - times[zero] - node_s * (times[node] - times[zero])
        wake_s = max(left, 0.0) / max(parallel_ops, 1)
    return node_s, sum(train) / len(train), wake_s


def _tiled(model: torch.nn.Module, shape, dtype: torch.dtype, tile: int):
    """``model`` run by the tile interpreter as ``bp.tiled(model, tile=tile)`` runs it, and its split."""
    plan = plan_graph(capture(model), [(shape, dtype, torch.device("cpu"))], tile)
    params = list(model.parameters())
    return (lambda x: execute.run(plan, (x,), params, torch.device("cpu"))), plan.split


def _best_step(
    net, model, x: torch.Tensor, training: bool, clock: Callable[[], float], repeats: int
) -> float:
    """Best time of a tiled inference, or training step, after a first call that plans."""

    def step() -> None:
        if training:
            model.zero_grad(set_to_none=True)
            net(x).sum().backward()
        else:
            with torch.no_grad():
                net(x)

    step()
    times = []
    for _ in range(repeats):
        start = clock()
        step()
        times.append(clock() - start)
    return min(times)
