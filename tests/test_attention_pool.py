"""Attention pooling, logsumexp and top-k over all positions, streamed over tiles, in float64.

Gated attention MIL (Ilse et al. 2018) on a small conv trunk, in the spellings people write:
a matrix product of the softmax with the flattened features, or the softmax viewed back as a
map, times the features, summed. Tiles are small against the image, with remainders, so tiles
touch every border and the interior; the feature map must never be a boundary tensor.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_launch import launch
from helpers import _compare, _loss, assert_tiled_matches
from torch import nn

import bigpicture as bp


class MIL(nn.Module):
    """Trunk -> features h; attention a = conv(tanh(conv h) * sigmoid(conv h)); pooled -> linear."""

    def __init__(self, pool: str, nd: int = 2, heads: int = 1):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
        self.trunk = nn.Sequential(conv(3, 6, 3, padding=1), nn.ReLU(), conv(6, 8, 3, stride=2, padding=1))
        self.v, self.u, self.w = conv(8, 5, 1), conv(8, 5, 1), conv(5, heads, 3, padding=1)
        self.head = nn.Linear(8, 2)
        self.pool, self.nd = pool, nd

    def forward(self, x):
        h = self.trunk(x)
        a = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h)))
        return POOLS[self.pool](a, h, tuple(range(2, 2 + self.nd)))


POOLS = {
    "matmul": lambda a, h, dims: torch.softmax(a.flatten(2), -1) @ h.flatten(2).transpose(1, 2),
    "matmul_method_spelling": lambda a, h, dims: (
        a.flatten(2).softmax(dim=2).matmul(h.flatten(2).permute(0, 2, 1))
    ),
    "matmul_features_first": lambda a, h, dims: (
        h.flatten(2) @ F.softmax(a.flatten(2), dim=-1).transpose(-1, -2)
    ),
    "view_as_sum": lambda a, h, dims: (F.softmax(a.flatten(2), dim=-1).view_as(a) * h).sum(dims),
    "view_as_sum_features_first": lambda a, h, dims: torch.sum(h * a.flatten(2).softmax(-1).view_as(a), dims),
    "with_attention_map": lambda a, h, dims: (
        torch.softmax(a.flatten(2), -1) @ h.flatten(2).transpose(1, 2),
        torch.softmax(a.flatten(2), -1),
    ),
    "logsumexp_flat": lambda a, h, dims: torch.logsumexp(h.flatten(2), -1),
    "logsumexp_dims": lambda a, h, dims: h.logsumexp(dim=dims),
    "logsumexp_keepdim": lambda a, h, dims: torch.logsumexp(h, dims, keepdim=True),
    "topk_mean": lambda a, h, dims: h.flatten(2).topk(3, dim=-1).values.mean(-1),
    "topk_smallest": lambda a, h, dims: torch.topk(h.flatten(2), 4, -1, largest=False)[0] * 2,
    "topk_indices": lambda a, h, dims: h.flatten(2).topk(2)[1],
}

CASES = {
    "gated_mil_matmul_2d": ("matmul", 2, 1, (2, 3, 20, 23), 8),
    "gated_mil_view_as_sum_2d": ("view_as_sum", 2, 1, (2, 3, 20, 23), 8),
    "gated_mil_matmul_3d": ("matmul", 3, 1, (1, 3, 10, 9, 11), 4),
    "gated_mil_view_as_sum_3d": ("view_as_sum", 3, 1, (1, 3, 10, 9, 11), 4),
    "two_heads_matmul": ("matmul", 2, 2, (1, 3, 17, 19), 6),
    "method_spelling": ("matmul_method_spelling", 2, 1, (1, 3, 17, 19), 6),
    "features_first": ("matmul_features_first", 2, 3, (2, 3, 17, 19), 6),
    "view_as_sum_features_first": ("view_as_sum_features_first", 2, 1, (1, 3, 17, 19), 6),
    "with_attention_map": ("with_attention_map", 2, 1, (1, 3, 17, 19), 6),
    "gated_mil_matmul_1d": ("matmul", 1, 1, (2, 3, 41), 8),
    "logsumexp_flat": ("logsumexp_flat", 2, 1, (2, 3, 17, 19), 6),
    "logsumexp_dims_3d": ("logsumexp_dims", 3, 1, (1, 3, 10, 9, 11), 4),
    "logsumexp_keepdim": ("logsumexp_keepdim", 2, 1, (1, 3, 17, 19), 6),
    "topk_mean": ("topk_mean", 2, 1, (2, 3, 17, 19), 6),
    "topk_smallest_3d": ("topk_smallest", 3, 1, (1, 3, 10, 9, 11), 4),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_pooling_over_positions_equals_untiled(name, one_thread):
    pool, nd, heads, shape, tile = CASES[name]
    torch.manual_seed(0)
    model = MIL(pool, nd, heads).double()
    net = assert_tiled_matches(model, torch.randn(shape, dtype=torch.float64), tile)
    assert len(net.plan.tiles) > 4
    roles = net.plan.split.roles
    dense = [k for k in net.plan.sinks if any(roles[u] in ("tail", "output") for u in k.users)]
    if pool != "with_attention_map":
        assert not dense, f"the feature map became a boundary tensor: {dense}"
    else:  # the attention map is an output: only its one channel is whole, not the features
        assert [net.plan.split.shapes[k][1] for k in dense] == [1]


def test_topk_indices_are_image_positions():
    torch.manual_seed(0)
    model = MIL("topk_indices").double()
    x = torch.randn(2, 3, 17, 19, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(bp.tiled(model, tile=6)(x), model(x), rtol=0, atol=0)


def test_attention_mil_trains_end_to_end():
    """A few SGD steps on a 'slide' tile by tile move every parameter as the untiled steps do."""
    torch.manual_seed(0)
    model = MIL("matmul").double()
    untiled, net = copy.deepcopy(model), bp.tiled(model, tile=8)
    x, label = torch.randn(1, 3, 40, 36, dtype=torch.float64), torch.tensor([1])
    for m, run in ((model, net), (untiled, untiled)):
        opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(run(x)[:, 0], label).backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), untiled.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert all(net.plan.split.roles[u] == "reduce" for k in net.plan.sinks for u in k.users)


def test_several_attention_channels_summed_is_a_clear_error():
    model = MIL("view_as_sum", heads=8)  # softmax per channel: not the attention pooling we stream
    with pytest.raises(bp.TilingError, match="one attention channel"):
        bp.tiled(model, tile=8)(torch.randn(1, 3, 16, 16))


DISTRIBUTED = ["gated_mil_matmul_2d", "gated_mil_view_as_sum_2d", "two_heads_matmul", "logsumexp_flat",
               "topk_mean"]  # fmt: skip


def ranks_match_untiled(rank: int, world: int, names: list[str]) -> None:
    """On each rank: the net over the world's ranks, each with its share of the tiles, against the
    untiled model in this process; the reductions' partial results are merged across ranks."""
    for name in names:
        pool, nd, heads, shape, tile = CASES[name]
        torch.manual_seed(0)
        model = MIL(pool, nd, heads).double()
        x = torch.randn(shape, dtype=torch.float64)
        x0, x1 = x.clone().requires_grad_(), x.clone().requires_grad_()
        names, params = zip(*model.named_parameters())
        expected = model(x0)
        g0 = torch.autograd.grad(_loss(expected), [x0, *params], allow_unused=True)
        net = bp.tiled(model, tile=tile, group=dist.group.WORLD)
        got = net(x1)
        assert len(net.plan.tiles) >= 2 * world, name  # every rank merges several tiles of its own
        _compare(got, expected, f"{name} output on rank {rank}")
        g1 = torch.autograd.grad(_loss(got), [x1, *params], allow_unused=True)
        for what, a, b in zip(("input", *names), g1, g0):
            if b is not None or a is not None:  # the pooling's own unused parameters: None in both
                _compare(a, b, f"{name} gradient of {what} on rank {rank}")
    with torch.no_grad():  # top-k positions: the image's, whichever rank found them
        model = MIL("topk_indices").double()
        x = torch.randn(2, 3, 17, 19, dtype=torch.float64)
        torch.testing.assert_close(bp.tiled(model, tile=6, group=dist.group.WORLD)(x), model(x), rtol=0, atol=0)


def test_pooling_over_positions_across_two_ranks():
    launch(ranks_match_untiled, 2, DISTRIBUTED)
