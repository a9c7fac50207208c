"""Mixed precision: ``torch.autocast`` around the tiled call casts in every tile as it does untiled.

Tolerance, and why (never tuned to a run): inside a tile every op sees the same values in the same
dtypes as untiled (``test_recompute_runs_under_the_forwards_autocast`` checks the casts directly),
so the two runs differ only where a sum over the image is rounded to the low-precision dtype. The
untiled model rounds each whole-image sum (a spatial mean, a parameter gradient) once; the tiled one
rounds each tile's partial sum and then their total, so with n tiles at most n + 1 roundings, each
of relative size u (the unit roundoff: 2^-8 for bfloat16, 2^-11 for float16) of at most the largest
magnitude involved: ``atol = (n + 1) * u * max|untiled|`` per tensor, ``rtol = 0``.

That model of rounding holds for normal numbers only: below float16's smallest normal (2^-14) values
are subnormal and each rounding errs by up to 2^-25 absolutely, whatever their size. An unscaled
float16 backward lands there (on this test's classifier, the global pool's gradient is ~1e-7), and
then the input gradients of the two runs legitimately differ by a few subnormal steps (seen on an AMD
EPYC host: 4 steps where the bound allowed 3.9). Float16 training scales the loss for exactly this
reason (``torch.amp.GradScaler``), and so does the test, as GradScaler does: by the largest power of two
up to ``LOSS_SCALE`` whose untiled step has no infinite gradient (``_scale``), the same for both runs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigpicture as bp

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
LOSS_SCALE = 2.0**12  # the largest loss scale tried: gradients out of float16's subnormal range (see above)


class UNetLike(nn.Module):
    """Pooling, upsampling, a skip concatenation and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=2, dilation=2)
        self.c = nn.Conv2d(12, 3, 1)

    def forward(self, x):
        h = F.relu(self.a(x))
        low = F.max_pool2d(h, 2)
        up = F.interpolate(F.relu(self.b(low)) + low, scale_factor=2, mode="nearest")
        return self.c(torch.cat([h, up], 1))


def _stack():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1))


def _classifier():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip


def _conv3d():
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv3d(4, 2, 3, padding=1))


# name: (model factory, input shape, tile); tiles touch every border and leave interior tiles
CASES = {
    "conv_stack_2d": (_stack, (1, 3, 40, 36), 16),
    "classifier_2d": (_classifier, (1, 3, 48, 40), 16),
    "unet_like_2d": (UNetLike, (1, 2, 40, 48), 16),
    "conv_3d": (_conv3d, (1, 1, 16, 12, 20), 8),
}


def _scale(model, x, dtype) -> float:
    """The largest power of two up to ``LOSS_SCALE`` whose untiled step's gradients are all finite (as
    GradScaler backs off from an overflow)."""
    scale = LOSS_SCALE
    while scale > 1:
        _, grads, x_grad = _step(model, model, x, dtype, scale)
        if all(g.isfinite().all() for g in (*grads, x_grad)):
            break
        scale /= 2
    return scale


def _step(f, model, x, dtype, scale: float = 1.0):
    """Output, parameter gradients and input gradient of one step under autocast (backward outside
    it), the loss scaled by ``scale``."""
    model.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=dtype):
        y = f(x)
    ((y.float() ** 2).sum() * scale).backward()
    return y, [p.grad.clone() for p in model.parameters()], x.grad


def _assert_within_rounding(tiled, untiled, tiles: int, dtype):
    atol = (tiles + 1) * UNIT_ROUNDOFF[dtype] * untiled.abs().max().item()
    torch.testing.assert_close(tiled, untiled, rtol=0, atol=atol)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_autocast_matches_untiled_under_the_same_autocast(name, dtype, device, one_thread):
    factory, shape, tile = CASES[name]
    torch.manual_seed(0)
    model, x = factory().to(device), torch.randn(shape, device=device)
    net = bp.tiled(model, tile=tile)
    scale = _scale(model, x, dtype)
    y_ref, g_ref, x_ref = _step(model, model, x, dtype, scale)
    y, g, xg = _step(net, model, x, dtype, scale)
    assert x_ref.isfinite().all()
    n = len(net.plan.tiles)
    assert n > 1 and y.dtype == y_ref.dtype == dtype  # the output in autocast's dtype, as untiled
    _assert_within_rounding(y, y_ref, n, dtype)
    for (pname, _), a, b in zip(model.named_parameters(), g, g_ref):
        assert a.dtype == b.dtype == torch.float32, pname
        _assert_within_rounding(a, b, n, dtype)
    _assert_within_rounding(xg, x_ref, n, dtype)


class Probe(torch.autograd.Function):
    """Records the autocast state and its input's dtype at every call (forward and recompute)."""

    calls: list = []

    @staticmethod
    def forward(ctx, x):
        if type(x) is torch.Tensor:  # not the planner's shape propagation on fake tensors
            Probe.calls.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), x.dtype))
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


class Probed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.b(Probe.apply(self.a(x)))


bp.register_pointwise(Probe)


@pytest.mark.parametrize("forward_amp, backward_amp", [(True, False), (False, True), (True, True)])
def test_recompute_runs_under_the_forwards_autocast(forward_amp, backward_amp):
    torch.manual_seed(0)
    model = Probed()
    net, x = bp.tiled(model, tile=8), torch.randn(1, 2, 24, 16)
    Probe.calls = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=forward_amp):
        y = net(x)
    forward = list(Probe.calls)
    with torch.autocast("cpu", dtype=torch.float16, enabled=backward_amp):  # another one, or none
        y.float().sum().backward()
    recompute = Probe.calls[len(forward) :]
    expected = (forward_amp, torch.bfloat16, torch.bfloat16 if forward_amp else torch.float32)
    assert len(forward) == len(net.plan.tiles) and len(recompute) == len(net.plan.tiles) - 1  # last tile kept
    assert set(forward) == set(recompute) == {expected}


def test_grad_scaler_step_matches_untiled(one_thread):
    torch.manual_seed(0)
    model, x, label = _classifier(), torch.randn(1, 3, 48, 40), torch.tensor([1])
    twin = copy.deepcopy(model)
    net = bp.tiled(model, tile=16)
    runs = []
    for f, params in ((net, model), (twin, twin)):
        optimizer = torch.optim.SGD(params.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for _ in range(2):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(f(x), label)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            runs.append([p.grad.clone() for p in params.parameters()])
            scaler.step(optimizer)
            scaler.update()
        assert scaler.get_scale() == 2.0**10  # no step was skipped for an inf or nan
    n = len(net.plan.tiles)
    for tiled, untiled in zip(runs[:2], runs[2:]):
        for a, b in zip(tiled, untiled):
            _assert_within_rounding(a, b, n, torch.bfloat16)
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), _classifier().parameters()))


def test_plan_and_prediction_use_the_autocast_dtype():
    model, x = _classifier(), torch.randn(1, 3, 64, 64)
    for net in (bp.tiled(model, tile=32), bp.tiled(model, memory="64MiB")):
        with torch.no_grad():
            net(x)
            assert net.plan.prediction.dtype == torch.float32
            with torch.autocast("cpu", dtype=torch.bfloat16):
                net(x)
            assert net.plan.dtype == torch.float32  # the input's: the tiles read it as the model does
            assert net.plan.prediction.dtype == torch.bfloat16  # what its convolutions compute in
            assert "bfloat16" in str(net.plan)


def test_no_fake_tensor_leaks_into_autocast_cache():
    # Planning inside autocast casts parameters on fake tensors; autocast must not cache those casts.
    model, x = _stack(), torch.randn(1, 3, 32, 32)
    net = bp.tiled(model, tile=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
        again = model(x)
    assert type(y) is torch.Tensor and type(again) is torch.Tensor
    torch.testing.assert_close(y, again, rtol=0, atol=0)
