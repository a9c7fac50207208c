"""Train-mode BatchNorm made exact by passes over the tiles (``multipass=True``), in float64.

A training step of the tiled model must equal the untiled model's: outputs, parameter and input
gradients, and every BatchNorm buffer afterwards (running mean, unbiased running variance,
num_batches_tracked; momentum, or a cumulative average for ``momentum=None``), updated once per
step. A second step and an eval-mode forward after it check that the buffers keep agreeing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import _compare, _loss
from torch import nn

import bigpicture as bp


def stack(nd, **bn):
    """conv -> BatchNorm -> relu -> strided conv -> BatchNorm -> conv, with BatchNorm options ``bn``."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
    norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[nd - 1]
    return nn.Sequential(conv(2, 4, 3, padding=1), norm(4, **bn), nn.ReLU(),
                         conv(4, 3, 3, stride=2, padding=1), norm(3, **bn), conv(3, 2, 3))  # fmt: skip


class Residual(nn.Module):
    """Two BatchNorms on parallel branches (one level), then a pooled head with BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4, momentum=0.3)
        self.head, self.bn_head = nn.Linear(4, 3), nn.BatchNorm1d(3)

    def forward(self, x):
        y = F.relu(self.bn_a(self.a(x)) + self.bn_b(self.b(x)))
        return self.bn_head(self.head(y.mean((2, 3))))


class AttentionMIL(nn.Module):
    """A gated-attention MIL head (Ilse et al. 2018) on a conv trunk with BatchNorm in training mode:
    the statistics' passes, then the softmax over every position streamed, in either spelling."""

    def __init__(self, spelling: str):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                   nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))  # fmt: skip
        self.v, self.u, self.w = nn.Conv2d(8, 5, 1), nn.Conv2d(8, 5, 1), nn.Conv2d(5, 1, 1)
        self.fc, self.spelling = nn.Linear(8, 2), spelling

    def forward(self, x):
        h = self.trunk(x)
        a = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h)))
        if self.spelling == "matmul":
            return self.fc((torch.softmax(a.flatten(2), -1) @ h.flatten(2).transpose(1, 2))[:, 0])
        return self.fc((torch.softmax(a.flatten(2), -1).view_as(a) * h).sum((2, 3)))


CASES = {
    "bn2d": (lambda: stack(2), (2, 2, 19, 22), 8),
    "bn1d": (lambda: stack(1), (3, 2, 37), 8),
    "bn3d": (lambda: stack(3), (2, 2, 9, 10, 7), 4),
    "no_affine": (lambda: stack(2, affine=False), (2, 2, 17, 16), 8),
    "no_running_stats": (lambda: stack(2, track_running_stats=False), (2, 2, 17, 16), 8),
    "momentum_none": (lambda: stack(2, momentum=None), (2, 2, 17, 16), 6),
    "batch_one": (lambda: stack(2, momentum=0.5), (1, 2, 21, 18), 8),
    "parallel_branches_and_pooled_head": (Residual, (2, 3, 15, 17), 6),
    "attention_mil_matmul": (lambda: AttentionMIL("matmul"), (2, 3, 20, 23), 8),
    "attention_mil_view_as_sum": (lambda: AttentionMIL("view_as_sum"), (2, 3, 20, 23), 8),
    "on_the_input_and_last": (
        lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2, affine=False)),
        (2, 3, 13, 14),
        5,
    ),
}


def randomise(model):
    """Affine parameters and running statistics away from their defaults, so that each matters."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.weight is not None:
                nn.init.normal_(m.weight, 1.0, 0.3)
                nn.init.normal_(m.bias, 0.0, 0.3)
            if m.running_mean is not None:
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def assert_steps_match(model, x, tile, steps=2):
    """``steps`` training steps tiled and untiled on copies of ``model``: the same everything."""
    tiled_model, untiled = model, copy.deepcopy(model)
    net = bp.tiled(tiled_model, tile=tile, multipass=True)
    for step in range(steps):
        x0, x1 = (x.detach().clone().requires_grad_() for _ in range(2))
        expected, got = untiled(x0), net(x1)
        _compare(got, expected, f"step {step} output")
        _loss(expected).backward()
        _loss(got).backward()
        _compare(x1.grad, x0.grad, f"step {step} input gradient")
        for (name, p), q in zip(tiled_model.named_parameters(), untiled.parameters()):
            _compare(p.grad, q.grad, f"step {step} gradient of {name}")
        for (name, b), c in zip(tiled_model.named_buffers(), untiled.buffers()):
            _compare(b, c, f"step {step} buffer {name}")
        with torch.no_grad():  # a plain SGD step, so the next one starts elsewhere
            for p, q in zip(tiled_model.parameters(), untiled.parameters()):
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad
                p.grad = q.grad = None
    tiled_model.eval(), untiled.eval()
    with torch.no_grad():
        _compare(net(x), untiled(x), "eval output after training")
    return net


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_mode_batchnorm_equals_untiled(name, one_thread):
    factory, shape, tile = CASES[name]
    torch.manual_seed(0)
    model = randomise(factory().double()).train()
    net = assert_steps_match(model, torch.randn(shape, dtype=torch.float64), tile)
    tracking = any(b.numel() for b in model.buffers())  # then eval mode is one pass, on running statistics
    assert bool(net.plan.earlier) != tracking


def test_buffers_update_once_per_step_not_per_tile():
    torch.manual_seed(0)
    model = stack(2).double().train()
    net = bp.tiled(model, tile=4, multipass=True)
    net(torch.randn(2, 2, 16, 16, dtype=torch.float64)).sum().backward()
    assert len(net.plan.tiles) > 1 and net.plan.earlier
    assert all(b == 1 for n, b in model.named_buffers() if n.endswith("num_batches_tracked"))


def test_plan_counts_the_passes_and_names_the_faster_option():
    model = stack(2).train()
    net = bp.tiled(model, tile=8, multipass=True)
    net(torch.randn(2, 2, 16, 16))
    text = str(net.plan)
    assert "3 over the tiles" in text and "bp.freeze_batchnorm" in text
    frozen = bp.tiled(bp.freeze_batchnorm(stack(2)).train(), tile=8)
    frozen(torch.randn(2, 2, 16, 16))
    assert not frozen.plan.earlier


def test_without_multipass_the_error_names_both_options():
    with pytest.raises(bp.TilingError, match="multipass=True") as e:
        bp.tiled(stack(2).train(), tile=8, multipass=False)(torch.randn(2, 2, 16, 16))
    assert "bp.freeze_batchnorm" in str(e.value)


def _monai(name, **kw):
    nets = pytest.importorskip("monai.networks.nets")
    return getattr(nets, name)(**kw)


def test_monai_resnet_2d_train_mode(one_thread):
    torch.manual_seed(0)
    model = _monai("ResNet", block="basic", layers=(1, 1, 1, 1), block_inplanes=(4, 8, 8, 8), spatial_dims=2,
                   n_input_channels=3, num_classes=2)  # fmt: skip
    model = randomise(model.double()).train()
    assert_steps_match(model, torch.randn(2, 3, 64, 64, dtype=torch.float64), 32, steps=1)


def test_monai_unet_3d_batchnorm_train_mode(one_thread):
    torch.manual_seed(0)
    model = _monai("UNet", spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
                   num_res_units=1, norm="batch")  # fmt: skip
    model = randomise(model.double()).train()
    assert_steps_match(model, torch.randn(2, 1, 12, 10, 8, dtype=torch.float64), 6, steps=1)


@pytest.mark.slow
def test_monai_densenet121_train_mode(one_thread):
    """All 121 layers (121 BatchNorms in train mode: a pass each), few channels: ~70 s of CPU."""
    torch.manual_seed(0)
    model = _monai(
        "DenseNet121", spatial_dims=2, in_channels=1, out_channels=2, init_features=4, growth_rate=2
    )
    model = randomise(model.double()).train()
    assert_steps_match(model, torch.randn(2, 1, 64, 64, dtype=torch.float64), 32, steps=1)
