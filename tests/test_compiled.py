"""``bp.tiled(model, compile=True)``: one compiled function per tile geometry, exact in float32.

Tolerance. Inductor fuses pointwise and normalisation chains and may reassociate within a fused
kernel, so compiled float32 differs from eager in the last bits, tiled or not; float64 would hide
nothing here (the question is whether the compiled tiles are the right tiles). We therefore
measure ``torch.compile(model)`` untiled against the eager model (``test_tolerance_is_compiles_own``)
and hold the tiled compiled model to the same tolerance class, ``TOL``: rtol 1e-4, atol 1e-5 (torch's
float32 default is rtol 1.3e-6, atol 1e-5). A wrong box or a tile reusing another's artefact where
it should not is off by O(1), far outside it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import _compare, _loss
from torch import nn
from torch.nn import functional as F

import bigpicture as bp

TOL = dict(rtol=1e-4, atol=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")


def _net2d():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.GELU(), nn.Upsample(scale_factor=2),
        nn.Conv2d(4, 3, 3, padding=1),
    ).eval()  # fmt: skip


def _net3d():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(1, 3, 3, padding=1),
        nn.InstanceNorm3d(3, affine=True),
        nn.SiLU(),
        nn.Conv3d(3, 2, 3, padding=1),
    )


def _randomise_norms(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    return model


def _run(model, x, grads, **tiled):
    """Outputs and, with ``grads``, the gradients of input and parameters (in that order)."""
    x = x.detach().clone().requires_grad_(grads)
    y = model(x)
    if not grads:
        return [y]
    params = [p for p in model.parameters() if p.requires_grad]
    return [y.detach(), *torch.autograd.grad(_loss(y), [x, *params])]


@pytest.fixture(autouse=True)
def _fallback_is_an_error(request):
    """In the tests that expect compiled tiles, a fallback to eager would pass without compiling."""
    with warnings.catch_warnings():
        if "falls_back" not in request.node.name and "eager" not in request.node.name:
            warnings.filterwarnings("error", message="compile=True")
        yield


def _compiled_net(model, tile):
    return bp.tiled(model, tile=tile, compile=True)


def _compiled_stats(net) -> list:
    return list(net._compiled.values())


def test_inference_2d_one_artefact_per_geometry():
    """A 16 x 64 image in tiles of 16: 4 tiles, 3 geometries (two border, one interior shared by
    tiles 1 and 2); a second call compiles nothing more."""
    model = _randomise_norms(_net2d())
    x = torch.randn(1, 2, 16, 64)
    net = _compiled_net(model, 16)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        _compare(net(x), model(x), "output", **TOL)
        (compiled,) = _compiled_stats(net)
        assert (compiled.compilations, compiled.compiled_calls, compiled.eager_calls) == (3, 4, 0)
        _compare(net(x + 1), model(x + 1), "output of a second call", **TOL)
    assert (compiled.compilations, compiled.compiled_calls) == (3, 8)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 3
    _compare(net.run(x), model(x).detach(), "net.run (inference, bigpicture infer's path)", **TOL)
    assert (compiled.compilations, compiled.compiled_calls) == (3, 12)  # the same artefacts


@pytest.mark.slow
def test_cli_infer_compile(tmp_path):
    """``bigpicture infer --compile`` writes what the untiled model computes."""
    import argparse

    import numpy as np
    import zarr

    from bigpicture.cli.infer import add_infer_command

    (tmp_path / "model.py").write_text(
        "from torch import nn\n"
        "def factory():\n"
        "    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1))\n"
    )
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_model", tmp_path / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = _randomise_norms(module.factory()).eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    x = np.random.default_rng(0).standard_normal((1, 2, 16, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    parser = argparse.ArgumentParser()
    add_infer_command(parser.add_subparsers())
    a = parser.parse_args(["infer", str(tmp_path / "x.npy"), "--out", str(tmp_path / "y.zarr"), "--model",
                           f"{tmp_path / 'model.py'}:factory", "--weights", str(tmp_path / "w.pt"), "--quiet",
                           "--tile", "16", "--compile"])  # fmt: skip
    assert a.run(a) == 0
    with torch.no_grad():
        expected = model(torch.from_numpy(x))
    got = torch.from_numpy(zarr.open_array(str(tmp_path / "y.zarr"), mode="r")[:])
    _compare(got, expected, "bigpicture infer --compile", **TOL)


@pytest.mark.slow
@pytest.mark.parametrize(
    "make, shape, tile, dtype",
    [(_net2d, (1, 2, 16, 48), 16, torch.float32), (_net3d, (1, 1, 8, 8, 24), 8, torch.float64)],
    ids=["2d-batchnorm-float32", "3d-instancenorm-float64"],
)
def test_training_matches_untiled(make, shape, tile, dtype):
    """Outputs, input and parameter gradients of a compiled training step (the recompute and its
    backward compiled) against the eager untiled model; InstanceNorm's statistics come from an
    earlier pass, so the compiled tiles take derived values as inputs.

    The 3D case runs in float64 with torch's default tolerances: its first convolution's bias feeds
    InstanceNorm, which removes it, so that gradient is 0 analytically and in float32 only the
    rounding of a sum that cancels (eager and compiled disagree there at 5e-5, both noise)."""
    model = make().to(dtype)
    if make is _net2d:
        model = _randomise_norms(model)
    x = torch.randn(shape, dtype=dtype)
    net = _compiled_net(model, tile)
    expected = _run(model, x, True)
    got = _run(net, x, True)
    names = ["output", "input gradient"] + [f"gradient of {n}" for n, _ in model.named_parameters()]
    tol = TOL if dtype == torch.float32 else {}
    for name, a, b in zip(names, got, expected, strict=True):
        _compare(a, b, name, **tol)
    assert all(c.compilations >= 1 and c.eager_calls == 0 for c in _compiled_stats(net))


@pytest.mark.slow
def test_tolerance_is_compiles_own():
    """The tolerance the tests use holds for torch.compile of the untiled model itself: the
    difference is inductor's, not tiling's."""
    model = _randomise_norms(_net2d())
    x = torch.randn(1, 2, 16, 48)
    expected = _run(model, x, True)
    got = _run(torch.compile(model), x, True)
    for a, b in zip(got, expected, strict=True):
        _compare(a, b, "torch.compile untiled", **TOL)


def test_position_dependent_plan_runs_eagerly():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
    )
    x = torch.randn(1, 1, 16, 32)
    net = bp.tiled(model, tile=16, compile=True)
    with torch.no_grad(), pytest.warns(UserWarning, match="align_corners"):
        y = net(x)
    torch.testing.assert_close(y, model(x))
    assert _compiled_stats(net)[0].compilations == 0


def test_no_c_compiler_falls_back(monkeypatch):
    """Inductor without a working C compiler (and no cached kernels): a warning, eager, exact."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    model, x = (
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Sigmoid()),
        torch.randn(1, 1, 16, 32),
    )
    net = bp.tiled(model, tile=16, compile=True)
    with torch.no_grad(), pytest.warns(UserWarning, match="compiling a tile failed"):
        y = net(x)
    torch.testing.assert_close(y, model(x))


def test_max_geometries_caps_compilation_eager_beyond():
    """Past ``max_geometries`` the tiles of new geometries run eagerly, with one warning."""
    model, x = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU()), torch.randn(1, 1, 16, 32)
    net = bp.tiled(model, tile=16, compile={"max_geometries": 0})
    with torch.no_grad(), pytest.warns(UserWarning, match="more than 0 tile geometries"):
        y = net(x)
    torch.testing.assert_close(y, F.relu(model[0](x)))
    assert _compiled_stats(net)[0].eager_calls == 2


@pytest.mark.parametrize(
    "shape, tile, keys",
    [((1, 2, 16, 80), 16, 3), ((1, 2, 80, 80), 16, 9), ((1, 2, 80, 72), 16, 9), ((1, 2, 16, 16), 16, 1)],
    ids=["strip-5-tiles", "grid-5x5", "grid-5x5-short-last", "one-tile"],
)
def test_geometry_keys_interior_shared_border_own(shape, tile, keys):
    """Per dimension: the first tile, the interior ones (translates) and the last; so 3 x 3 = 9
    artefacts for a 5 x 5 grid, however large the grid, and a short last tile is its own."""
    from bigpicture.engine.compiled import CompiledTiles

    net = bp.tiled(_net2d(), tile=tile)
    plan = net.plan_for(torch.zeros(shape), training=False)
    compiled = CompiledTiles(plan)
    found = {compiled.key(t, plan.needs(t), torch.device("cpu")) for t in plan.tiles}
    assert None not in found and len(found) == keys
