"""What the CPU model charges for the memory layouts its ops meet: a transposed convolution's
workspace (its own calibration, "2t"), and a BatchNorm reading the strided view a natively padded
convolution leaves at the image border (its own rate, "norm_strided"), and a padded copy of a
border tile's input exactly where the engine makes one (3D convolutions on a CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bigpicture as bp
from bigpicture.perf.bytes_only import bytes_only
from bigpicture.perf.devices import local_cpu
from bigpicture.perf.predict import predict
from bigpicture.perf.rates import Rates
from bigpicture.perf.steps import geometries, node_step, spatial_inputs

F32 = 4


def _calibration(**ops) -> dict:
    base = {"dtype": "float32", "conv": [], "stream": {}, "pool": {}, "engine_node_s": 0.0,
            "engine_train_node_s": 0.0, "conv_workspace": {"2": ["operand", 1.0]}}  # fmt: skip
    return {"ops": {**base, **ops}}


def test_transposed_convolution_workspace_by_hand():
    # oneDNN's 2D transposed convolution held twice its larger operand on this machine (calibrate.py)
    net = nn.Sequential(nn.ConvTranspose2d(8, 2, 3, stride=2, padding=1, output_padding=1)).eval()
    plan = bp.make_plan(net, (1, 8, 16, 16), tile=16)
    out, x = 2 * 32 * 32 * F32, 8 * 16 * 16 * F32

    def working_set(workspace: dict) -> int:
        rates = Rates(local_cpu(), torch.float32, _calibration(conv_workspace=workspace))
        p = predict(plan, "cpu", shared={"rates": bytes_only(rates)})
        return dict(p.memory_parts)["tile working set"]

    # its output, the previous tile's output (the sink), and the workspace
    assert working_set({"2": ["operand", 1.0], "2t": ["operand", 2.0]}) == out + out + 2 * max(out, x)
    # a calibration without transposed convolutions of their own: the convolutions' figure
    assert working_set({"2": ["operand", 1.0]}) == out + out + max(out, x)


def test_workspace_by_kind_of_convolution():
    rates = Rates(local_cpu(), torch.float32, _calibration(conv_workspace={"2": ["operand", 1.0],
                                                                            "2t": ["operand", 2.0]}))  # fmt: skip
    assert rates.workspace(2, 1000, 9000) == 1000
    assert rates.workspace(2, 1000, 9000, transposed=True) == 2000
    assert rates.workspace(3, 1000, 9000, transposed=True) == 0  # nothing calibrated for 3D


def _conv_bn(nd: int = 2) -> nn.Module:
    conv, norm = (nn.Conv2d, nn.Conv3d)[nd - 2], (nn.BatchNorm2d, nn.BatchNorm3d)[nd - 2]
    torch.manual_seed(0)
    m = nn.Sequential(conv(3, 4, 3, padding=1), norm(4), nn.ReLU(), conv(4, 4, 3, stride=2, padding=1), norm(4))
    for b in (m[1], m[4]):
        b.running_mean.uniform_(-1, 1), b.running_var.uniform_(0.5, 2)
    return m.eval()


class _NormInputs(TorchDispatchMode):
    """Whether each BatchNorm's input is contiguous, in the order the tile interpreter runs them."""

    def __init__(self) -> None:
        super().__init__()
        self.contiguous: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "batch_norm" in str(func):
            self.contiguous.append(args[0].is_contiguous())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("nd, shape, tile", [(2, (1, 3, 20, 17), 8), (3, (1, 3, 11, 9, 10), 4)])
def test_strided_batchnorm_inputs_are_the_ones_the_engine_makes(nd, shape, tile, one_thread):
    """The model's flag (``steps.geometries``: a norm's input dimensions read as a strided view)
    is true exactly where the tile interpreter hands BatchNorm a non-contiguous tensor."""
    m = _conv_bn(nd)
    net = bp.tiled(m, tile=tile)
    x = torch.randn(shape)
    plan = net.plan_for(x, training=False)
    split = plan.split
    norms = [n for n in split.order if n.op == "call_module" and isinstance(m.get_submodule(n.target), nn.BatchNorm2d | nn.BatchNorm3d)]  # fmt: skip
    expected = []
    for t in plan.tiles:
        need = plan.needs(t)
        for n in norms:
            stored = need[spatial_inputs(split, n, need)[0]]
            expected.append(not any(g[2] for g in geometries(split, n, need, stored)))
    mode = _NormInputs()
    with torch.no_grad(), mode:
        net(x)
    assert mode.contiguous == expected
    if nd == 3:  # on a CPU a 3D convolution reads a padded copy (``Conv.pads_natively``): nothing crops
        assert all(expected)
        return
    assert not all(expected) and any(expected), "tiles at the border crop, interior ones do not"


def test_strided_batchnorm_runs_at_its_own_rate():
    stream = {"norm": [[1, 4e9], [2**40, 4e9]], "norm_strided": [[1, 1e9], [2**40, 1e9]],
              "unary": [[1, 4e9], [2**40, 4e9]]}  # fmt: skip
    backward = {"norm": [[1, 3e9], [2**40, 3e9]], "norm_strided": [[1, 1.5e9], [2**40, 1.5e9]]}
    rates = Rates(local_cpu(), torch.float32, _calibration(stream=stream, stream_backward=backward))
    m = _conv_bn()
    plan = bp.tiled(m, tile=8).plan_for(torch.randn(1, 3, 20, 17), training=False)
    split, norm = plan.split, next(n for n in plan.split.order if n.target == "1")
    seconds = {}
    for t in plan.tiles:
        need = plan.needs(t)
        st = node_step(split, norm, need, False, True, F32, rates, {})
        stored = need[spatial_inputs(split, norm, need)[0]]
        strided = any(g[2] for g in geometries(split, norm, need, stored))
        moved = 2 * 4 * need[norm].numel * F32  # read and written
        assert st.fwd_s == pytest.approx(moved / (1e9 if strided else 4e9))
        # its backward reads the gradient and the saved input, writes the input's gradient; its
        # weight's and bias's gradients summed in float64 (copy and add, at the unary rate here)
        assert st.bwd_s == pytest.approx(1.5 * moved / (1.5e9 if strided else 3e9) + (4 + 4) * 36 / 4e9)
        seconds[strided] = st.fwd_s
    assert set(seconds) == {False, True}
    # a calibration from before the strided rate: every BatchNorm at the contiguous one
    del stream["norm_strided"]
    old = Rates(local_cpu(), torch.float32, _calibration(stream=stream))
    need = plan.needs(plan.tiles[0])
    assert node_step(split, norm, need, False, True, F32, old, {}).fwd_s == pytest.approx(
        2 * 4 * need[norm].numel * F32 / 4e9
    )


def test_parameter_gradients_summed_in_float64_per_tile(one_thread):
    """Each tile's backward converts every parameter's gradient to float64 and adds it to the run's
    sum (the engine's ``_to_copy`` per parameter per tile, counted here, plus one back at the end);
    the model charges that copy and add to the step of the node owning the parameters."""
    from torch.profiler import profile

    torch.manual_seed(0)
    m = bp.freeze_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).train())
    net = bp.tiled(m, tile=16)
    x = torch.randn(1, 3, 48, 40)
    net(x).sum().backward()
    with profile(record_shapes=True) as prof:
        m.zero_grad(set_to_none=True)
        net(x).sum().backward()
    copies = {tuple(e.input_shapes[0]): e.count for e in prof.key_averages(group_by_input_shape=True)
              if e.key == "aten::_to_copy" and e.input_shapes and e.input_shapes[0]}  # fmt: skip
    tiles = len(net.plan.tiles)
    assert copies == {(8, 3, 3, 3): tiles + 1, (8,): 3 * (tiles + 1)}  # conv weight, bias; norm weight, bias

    stream = {kind: [[1, 1e9], [2**40, 1e9]] for kind in ("unary", "binary", "norm", "copy")}
    backward = {"norm": [[1, 2e9], [2**40, 2e9]]}
    rates = Rates(local_cpu(), torch.float32, _calibration(stream=stream, stream_backward=backward))
    plan = net.plan_for(x, training=True)
    split, norm = plan.split, next(n for n in plan.split.order if n.target == "1")
    need = plan.needs(plan.tiles[0])
    st = node_step(split, norm, need, True, True, F32, rates, {})
    moved = 3 * 8 * need[norm].numel * F32  # the gradient and the saved input read, the input's written
    elements = 8 + 8  # the norm's weight and bias
    assert st.bwd_s == pytest.approx(moved / 2e9 + elements * 12 / 1e9 + elements * 24 / 1e9)


@pytest.mark.parametrize("nd", [2, 3])
def test_padded_copy_charged_where_the_engine_makes_one(nd, one_thread, monkeypatch):
    """A zero-padded convolution at the image border: the model charges a padded copy of its input
    exactly where the engine makes one (3D on a CPU, ``Conv.pads_natively``), counted on the CPU;
    a GPU prediction (native padding) charges none."""
    from bigpicture.engine import padding
    from bigpicture.perf.devices import get_device

    conv = (nn.Conv2d, nn.Conv3d)[nd - 2]
    torch.manual_seed(0)
    m = nn.Sequential(conv(3, 4, 3, padding=1), nn.ReLU(), conv(4, 2, 3, padding=1)).eval()
    x = torch.randn((1, 3) + (12,) * nd)
    net = bp.tiled(m, tile=6)
    plan = net.plan_for(x, training=False)
    split = plan.split
    convs = [n for n in split.order if n.op == "call_module" and isinstance(m.get_submodule(n.target), conv)]
    copies = []
    pad = padding._Pad.apply
    monkeypatch.setattr(padding._Pad, "apply", lambda *a: copies.append(1) or pad(*a))
    with torch.no_grad():
        net(x)
    cpu = bytes_only(Rates(local_cpu(), torch.float32, _calibration()))
    gpu = bytes_only(Rates(get_device("H100-SXM"), torch.float32))
    charged = {"cpu": 0, "gpu": 0}
    for t in plan.tiles:
        need = plan.needs(t)
        for n in convs:
            charged["cpu"] += node_step(split, n, need, False, True, F32, cpu, {}).padded > 0
            charged["gpu"] += node_step(split, n, need, False, True, F32, gpu, {}).padded > 0
    assert charged["cpu"] == len(copies)
    assert (len(copies) > 0) == (nd == 3), "3D pads by a copy on a CPU, 2D natively"
    assert charged["gpu"] == 0
