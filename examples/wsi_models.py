"""The demo's networks: one small CNN trunk, pooled over a whole slide or over one patch.

    slide (1, 3, H, W) uint8 --trunk--> features (1, 64, H/16, W/16) --1x1 conv--> scores (1, 1, H/16, W/16)
                                                                    --pool--> slide logit (1, 1)

The score map is the heatmap: one score per 16 x 16 px, the evidence of each place. Pooling:

- ``mean``: the mean score. A linear head after average pooling is the same network.
- ``lse``: log of the mean of exp(score), a smooth maximum (log-sum-exp pooling): a small lesion
  with high scores raises the slide's logit where the mean would dilute it. Both are a pointwise
  op, a spatial mean (streamed over tiles by ``bp.tiled``) and a pointwise op, so both are exact
  tiled.
- attention-MIL: HOOK, not implemented here. ``pool="attention"`` raises until bigpicture streams
  attention pooling (softmax over positions of one score map, weighting another: a global op that
  the global-ops work makes exact); then ``AttentionPool`` below is the place to plug it in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import bigpicture as bp

WIDTHS = (16, 32, 32, 64)
STRIDE = 16
CLAMP = 20.0  # scores are clamped before exp in ``lse`` pooling, so float32 never overflows


def trunk(widths=WIDTHS) -> nn.Sequential:
    """Four stride-2 3x3 convolutions with BatchNorm and ReLU, then one more 3x3 at 1/16."""
    layers, cin = [], 3
    for cout in widths:
        layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    layers += [nn.Conv2d(cin, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU()]
    return nn.Sequential(*layers)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Raw 0..255 RGB to roughly zero mean, unit scale: pointwise, so it tiles. ``contiguous``:
    slide regions arrive channels-last (see pathology_demo.py on oneDNN)."""
    return (x.contiguous() / 255 - 0.75) / 0.2  # uint8 becomes float32; a float64 input stays float64


class ScoreMap(nn.Module):
    """The score at every 16 x 16 px: trunk, then a 1x1 convolution."""

    def __init__(self, widths=WIDTHS):
        super().__init__()
        self.trunk = trunk(widths)
        self.score = nn.Conv2d(widths[-1], 1, 1)

    def features(self, x):
        return self.trunk(normalise(x))

    def forward(self, x):
        return self.score(self.features(x))


def pool_mean(scores: torch.Tensor) -> torch.Tensor:
    return scores.mean(dim=(2, 3))


def pool_lse(scores: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.exp(torch.clamp(scores, max=CLAMP)).mean(dim=(2, 3)))


def pool_attention(scores: torch.Tensor) -> torch.Tensor:
    """HOOK for attention-MIL pooling over positions (see the module docstring)."""
    raise NotImplementedError(
        "attention-MIL pooling over a whole slide needs bigpicture to stream attention over tiles; "
        "until then use pool='mean' or 'lse' (the patch baseline has attention-MIL over patch features)"
    )


POOLS = {"mean": pool_mean, "lse": pool_lse, "attention": pool_attention}


class SlideNet(nn.Module):
    """A whole slide in, one logit out (positive = lesion present)."""

    def __init__(self, pool: str = "lse", widths=WIDTHS):
        super().__init__()
        self.map = ScoreMap(widths)
        self.pool = POOLS[pool]

    def forward(self, x):
        return self.pool(self.map(x))


def build(pool: str = "lse", seed: int = 0) -> SlideNet:
    """The network with BatchNorm frozen (running statistics), so it tiles while training."""
    torch.manual_seed(seed)
    model = SlideNet(pool)
    bp.freeze_batchnorm(model)
    return model.train()


def loss_of(logit: torch.Tensor, label: int) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logit.reshape(-1), torch.full((logit.numel(),), float(label)))


class AttentionMIL(nn.Module):
    """Gated attention-MIL (Ilse et al., 2018) over a bag of patch features (n, d) -> one logit."""

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.value = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())
        self.gate = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid())
        self.attend = nn.Linear(hidden, 1)
        self.head = nn.Linear(dim, 1)

    def weights(self, bag: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.attend(self.value(bag) * self.gate(bag)).squeeze(-1), 0)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        return self.head(self.weights(bag) @ bag).reshape(1, 1)
