"""Global stages: a subgraph over all tokens (attention, LayerNorm over tokens) runs untiled on
tensors held whole between passes, and later tiles read its outputs box by box (engine/stages.py).

Every case is compared with the untiled model in float64: outputs, parameter gradients and input
gradients, on grids of at least 3 tiles per dimension (tiles at every border and in the interior).
The MONAI rows (ViT, UNETR 2D and 3D, SwinUNETR 2D) are in benchmarks/census.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_tiled_matches
from torch import nn

import bigpicture as bp


class TokenNet(nn.Module):
    """Patch-embedding conv -> one transformer block on the tokens -> tokens back to a grid ->
    transposed-conv decoder, concatenated with a conv of the full-resolution input (a skip)."""

    def __init__(self, nd=2, c=2, width=8, patch=4, heads=2, attention="mha", skip=True):
        super().__init__()
        conv, up = (nn.Conv2d, nn.ConvTranspose2d) if nd == 2 else (nn.Conv3d, nn.ConvTranspose3d)
        self.attention, self.heads, self.skip_on = attention, heads, skip
        self.embed = conv(c, width, patch, stride=patch)
        self.norm = nn.LayerNorm(width)
        self.mha = nn.MultiheadAttention(width, heads, batch_first=True)
        self.qkv = nn.Linear(width, 3 * width)
        self.mlp = nn.Sequential(nn.Linear(width, 16), nn.GELU(), nn.Linear(16, width))
        self.up = up(width, 4, patch, stride=patch)
        self.relu = nn.ReLU(inplace=True)  # in place on a box sliced from a whole tensor
        self.skip = conv(c, 4, 3, padding=1)
        self.head = conv(8 if skip else 4, 3, 3, padding=1)

    def attend(self, h):
        if self.attention == "mha":
            return self.mha(h, h, h, need_weights=False)[0]
        n, tokens, c = h.shape
        q, k, v = self.qkv(h).reshape(n, tokens, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, tokens, c)

    def forward(self, x):
        e = self.embed(x)
        t = e.flatten(2).transpose(1, 2)
        t = t + self.attend(self.norm(t))
        t = t + self.mlp(t)
        grid = t.transpose(1, 2).reshape(e.shape)
        d = self.relu(self.up(grid))
        if self.skip_on:
            d = torch.cat([d, F.relu(self.skip(x))], 1)
        return self.head(d)


CASES = {  # name: (model kwargs, input shape, tile)
    "2d_multihead": (dict(nd=2, attention="mha"), (2, 2, 24, 24), 8),
    "2d_sdpa": (dict(nd=2, attention="sdpa"), (1, 2, 24, 20), 8),
    "2d_no_skip": (dict(nd=2, attention="sdpa", skip=False), (1, 2, 24, 24), 8),
    "3d_sdpa": (dict(nd=3, attention="sdpa"), (1, 2, 12, 12, 12), 4),
}


def _model(kwargs):
    torch.manual_seed(0)
    return TokenNet(**kwargs).double()


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_is_exact(name, one_thread):
    kwargs, shape, tile = CASES[name]
    x = torch.randn(shape, dtype=torch.float64)
    net = assert_tiled_matches(_model(kwargs), x, tile)
    plan = net.plan_for(x)
    assert len(plan.earlier) == 1 and all(g >= 3 for g in plan.grid), plan
    assert "global stages" in str(plan) and "held whole" in str(plan), plan


@pytest.mark.parametrize("name", ["2d_multihead", "3d_sdpa"])
def test_inference_is_exact(name, one_thread):
    kwargs, shape, tile = CASES[name]
    model = _model(kwargs).eval()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        expected, got = model(x), bp.tiled(model, tile=tile)(x)
    torch.testing.assert_close(got, expected)


def test_plan_names_the_stage_and_its_tensors():
    kwargs, shape, tile = CASES["2d_sdpa"]
    plan = bp.make_plan(_model(kwargs), shape, tile=tile, dtype=torch.float64, training=True)
    text = str(plan)
    assert "2 over the tiles" in text, text
    assert "held whole (a global stage: scaled_dot_product_attention" in text, text
    assert "global stages    1 whole tensors, 1.88 KiB" in text, text  # 8 channels x 6 x 5 tokens x 8 B
    assert "(1, 8, 6, 5)" in text and "for pass 1" in text, text
    parts = dict(plan.prediction.memory_parts)
    assert parts["global stages"] > 2 * 1920, parts  # the untiled values and their gradients too
    assert any(s.name == "global stages (untiled)" and s.seconds > 0 for s in plan.prediction.stages)


def test_stage_over_the_budget_is_an_error_naming_its_size_and_op():
    kwargs, _, _ = CASES["2d_sdpa"]
    model = _model(dict(kwargs, patch=1))  # attention over every pixel: 4096 tokens
    with pytest.raises(bp.TilingError) as info:
        bp.make_plan(model, (1, 2, 64, 64), memory="4MiB", training=True)
    message = str(info.value)
    for fragment in ("global stages need", "MiB", "budget of 4.00 MiB", "scaled_dot_product_attention",
                     "(1, 8, 64, 64)", "every position at once"):  # fmt: skip
        assert fragment in message, message


def test_one_pass_only_makes_a_stage_an_error():
    kwargs, shape, tile = CASES["2d_sdpa"]
    with pytest.raises(bp.TilingError, match="multipass=False allows one pass") as info:
        bp.tiled(_model(kwargs), tile=tile, multipass=False)(torch.randn(shape, dtype=torch.float64))
    assert "attention" in str(info.value)


def test_gradients_reach_the_untiled_subgraph_parameters(one_thread):
    """The transformer's parameters run untiled; their gradient comes from every later tile."""
    kwargs, shape, tile = CASES["2d_multihead"]
    model = _model(kwargs)
    x = torch.randn(shape, dtype=torch.float64)
    bp.tiled(model, tile=tile)(x).square().sum().backward()
    tiled = {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("qkv")}
    model.zero_grad()
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        if name.startswith("qkv"):  # unused by the multi-head variant
            continue
        assert p.grad is not None and torch.count_nonzero(p.grad), name
        torch.testing.assert_close(tiled[name], p.grad, msg=name)


def test_net_run_into_memory_and_zarr(tmp_path):
    pytest.importorskip("zarr")
    import numpy as np

    kwargs, shape, tile = CASES["2d_sdpa"]
    model = _model(kwargs).eval()
    x = torch.randn(shape, dtype=torch.float64)
    net = bp.tiled(model, tile=tile)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(net.run(x), expected)
    stored = net.run(x, out=tmp_path / "out.zarr")
    torch.testing.assert_close(torch.as_tensor(np.asarray(stored[:])), expected)


@pytest.mark.slow
def test_swinunetr_over_the_budget_explains_its_windows():
    """SwinUNETR is exact while its stages fit (the census row); at 1024^2 in 256 MiB they do not."""
    nets = pytest.importorskip("monai.networks.nets")
    model = nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1),
                           num_heads=(1, 1, 1, 1), spatial_dims=2)  # fmt: skip
    with pytest.raises(bp.TilingError) as info:
        bp.make_plan(model, (1, 1, 1024, 1024), memory="256MiB", training=True)
    message = str(info.value)
    for fragment in ("global stages need", "(1, 12, 512, 512)", "Window attention (Swin)", "window grid"):
        assert fragment in message, message
