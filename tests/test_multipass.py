"""Global ops made exact by passes over the tiles (the default; ``multipass=False`` forbids them):
statistics and SE blocks.

Checked in float64. In float32 the gradient through the statistics is summed in another order
than PyTorch's fused norm backward and differs by rounding (~1e-5 relative on some parameter
gradients); that is not covered by the default float32 tolerance, so no float32 test claims it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_tiled_matches
from torch import nn

import bigpicture as bp


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(c, 2), nn.Linear(2, c)
        self.out = nn.Conv2d(c, 2, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3))))))
        return self.out(y * s[:, :, None, None])


class Norms(nn.Module):
    """GroupNorm, then InstanceNorm at a lower resolution: two levels of statistics, three passes."""

    def __init__(self, nd=2):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
        inorm = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[nd - 1]
        self.a = conv(2, 6, 3, padding=1)
        self.gn = nn.GroupNorm(3, 6)
        self.b = conv(6, 4, 3, stride=2, padding=1)
        self.inorm = inorm(4, affine=True)
        self.c = conv(4, 2, 3, padding=1)

    def forward(self, x):
        return self.c(F.relu(self.inorm(self.b(F.relu(self.gn(self.a(x)))))))


CASES = {
    "groupnorm_and_instancenorm_2d": (lambda: Norms(2), (2, 2, 19, 22), 8),
    "groupnorm_and_instancenorm_1d": (lambda: Norms(1), (1, 2, 37), 8),
    "groupnorm_and_instancenorm_3d": (lambda: Norms(3), (1, 2, 9, 10, 7), 4),
    "squeeze_excitation": (lambda: SqueezeExcite(4), (2, 3, 17, 15), 6),
    "instancenorm_without_affine_then_pool": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4), nn.AdaptiveMaxPool2d(1), nn.Flatten()),
        (1, 3, 16, 17),
        5,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_multipass_equals_untiled(name):
    factory, shape, tile = CASES[name]
    torch.manual_seed(0)
    model = factory().double()
    for m in model.modules():  # non-trivial affine parameters
        if isinstance(m, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    net = assert_tiled_matches(model, torch.randn(shape, dtype=torch.float64), tile)  # no flag: the default
    assert net.plan.earlier, "a global op needs at least one earlier pass"


def test_multipass_false_makes_global_ops_an_error_that_names_the_option():
    with pytest.raises(bp.TilingError, match="multipass=False allows one pass") as e:
        bp.tiled(Norms(2), tile=8, multipass=False)(torch.randn(1, 2, 16, 16))
    assert "GroupNorm" in str(e.value) and "the default" in str(e.value)
    with pytest.raises(bp.TilingError, match="multipass=False allows one pass") as e:
        bp.tiled(SqueezeExcite(4), tile=8, multipass=False)(torch.randn(1, 3, 16, 16))
    assert "squeeze-excitation" in str(e.value) and "the default" in str(e.value)
    with pytest.raises(bp.TilingError, match="multipass=False allows one pass"):
        bp.make_plan(Norms(2), (1, 2, 16, 16), tile=8, multipass=False)


def test_plan_says_how_many_passes_and_why():
    net = bp.tiled(Norms(2), tile=8)
    net(torch.randn(1, 2, 16, 16))
    text = str(net.plan)
    assert "3 over the tiles" in text
    assert "pass 1 uses GroupNorm `gn`" in text and "pass 2 uses InstanceNorm2d `inorm`" in text, text
    net = bp.tiled(SqueezeExcite(4), tile=8)
    net(torch.randn(1, 3, 16, 16))
    assert "2 over the tiles" in str(net.plan) and "pass 1 uses Tensor.mean `mean`" in str(net.plan)
    plan = bp.make_plan(Norms(2), (1, 2, 16, 16), tile=8)
    assert "3 over the tiles" in str(plan) and len(plan.earlier) == 2
    assert not bp.tiled(nn.Conv2d(2, 2, 3), tile=8).plan_for(torch.randn(1, 2, 16, 16)).earlier


def test_a_whole_image_map_used_by_later_tiles_is_held_whole():
    """A map computed in the tail (here from global pooling to 2 x 2, resampled back to the image)
    is held whole and read box by box by a later pass (a global stage, engine/stages.py): exact;
    with multipass=False a TilingError before any tile, not a shape error."""

    class PyramidPooling(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            pooled = F.adaptive_max_pool2d(y, 2)
            return y + F.interpolate(pooled, size=y.shape[2:])

    torch.manual_seed(0)
    model = PyramidPooling().double()
    net = assert_tiled_matches(model, torch.randn(1, 3, 16, 16, dtype=torch.float64), 8)
    assert len(net.plan.earlier) == 1, net.plan
    with pytest.raises(bp.TilingError, match="multipass=False allows one pass"):
        bp.tiled(PyramidPooling(), tile=8, multipass=False)(torch.randn(1, 3, 16, 16))


def test_monai_attention_unet_with_instancenorm():
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    model = nets.AttentionUnet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2)).double().eval()
    assert_tiled_matches(model, torch.randn(1, 1, 32, 28, dtype=torch.float64), 16)


def test_monai_segresnet_with_groupnorm():
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    model = nets.SegResNet(spatial_dims=2, in_channels=1, out_channels=2, init_filters=8).double().eval()
    assert_tiled_matches(model, torch.randn(1, 1, 32, 32, dtype=torch.float64), 16)


def test_cli_plan_takes_extra_passes_by_default_and_no_multipass_refuses(tmp_path, monkeypatch, capsys):
    from bigpicture.cli import main

    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "nets.py"
    path.write_text("from torch import nn\n\ndef gn():\n    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), "
                    "nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 3, padding=1))\n")  # fmt: skip
    args = ["plan", "--model", f"{path}:gn", "--input", "3x256x256", "--device", "cpu", "--tile", "64"]
    for flag in ([], ["--multipass"]):  # the old flag is still accepted
        assert main(args + flag) == 0
        assert "cpu" in capsys.readouterr().out.splitlines()[2]
    assert main(args + ["--no-multipass"]) == 2
    assert "multipass=False allows one pass" in capsys.readouterr().err
