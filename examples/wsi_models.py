"""The demo's networks: one small CNN trunk, pooled over a whole slide or over one patch.

    slide (1, 3, H, W) uint8 --trunk--> features (1, 64, H/16, W/16) --1x1 conv--> scores (1, 1, H/16, W/16)
                                                                    --pool--> slide logit (1, 1)

The trunk starts coarse: a 4 x 4 convolution of stride 4 (each output sees 2 x 2 um at 0.5 um/px,
finer than a nucleus), then two stride-2 3x3 convolutions and one more 3x3 at 1/16. Why: at
2048^2 the stride-2 first stage of the earlier trunk (16 channels at 1024^2, 32 at 512^2) cost 5x
the CPU time of the whole rest, and a 1% lesion is only findable at 2048^2 (examples/RESULTS.md).

The score map is the heatmap: one score per 16 x 16 px, the evidence of each place. Pooling:

- ``mean``: the mean score. A linear head after average pooling is the same network. It dilutes a
  lesion of 1% of the tissue 100-fold.
- ``lse``: log of the mean of exp(score), a smooth maximum (log-sum-exp pooling). Both are a
  pointwise op, a spatial mean (streamed over tiles by ``bp.tiled``) and a pointwise op, so both
  are exact tiled.
- ``topk``: the mean of the ``TOPK`` highest scores (top-k over positions, streamed by
  ``bp.tiled``), which a lesion of 40-60 cells fills without dilution; and beside it, as a second
  output, the mean over every position of softplus(score), the per-position loss of "no lesion
  here". ``loss_of`` adds it for negative slides only: every place of a negative slide is known to be
  lesion-free (the multiple-instance assumption; still slide labels only), so negative slides
  teach every position, not only their top k.
- ``attention``: gated attention-MIL (Ilse et al., 2018) over every position of the slide: the
  features are pooled with softmax weights over all positions, ``softmax(a.flatten(2)) @
  h.flatten(2).T``, then a linear head (the 1x1 score convolution's weights). ``bp.tiled`` streams
  this softmax over the tiles (online softmax), exactly; the feature map is never whole. As the
  head is linear, the logit is also the attention-weighted mean of the score map, which is how
  the heatmap (the attention weights) and the logit are read from one tiled inference pass.

The border: the trunk's three padded 3x3 convolutions zero-pad, so the ``MARGIN`` cells along each
edge of the score map see zeros beyond the image, a pattern alike on every slide and unlike any
tissue. Pooled, they won: top-k took the border strip as the top places of positive and negative
slides alike (examples/RESULTS.md). The whole-slide pools therefore read the inner map only
(``inner``), and the heatmaps show 0 on the margin: no score there is ever used.

Every model has ``evidence`` (a module: slide -> per-position maps, run tile by tile) and
``readout`` (those maps -> slide logit and heatmap), so prediction is one tiled pass for all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import bigpicture as bp

WIDTHS = (16, 32, 64)  # the stride-4 stem's, then one per stride-2 convolution
STRIDE = 16
TOPK = 16  # top-k pooling: the mean of the k highest scores (a lesion covers 40-60 cells at 2048^2)
MARGIN = 2  # score-map cells along each edge that the trunk's zero padding reaches (see ``inner``)
CLAMP = 20.0  # scores are clamped before exp in ``lse`` pooling, so float32 never overflows


def trunk(widths=WIDTHS) -> nn.Sequential:
    """A 4 x 4 stride-4 convolution, stride-2 3x3 convolutions (BatchNorm, ReLU after each) down to
    1/16, then one more 3x3 at 1/16."""
    layers, cin = [nn.Conv2d(3, widths[0], 4, 4, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()], widths[0]
    for cout in widths[1:]:
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


def inner(maps: torch.Tensor, margin: int = MARGIN) -> torch.Tensor:
    """The map without its ``margin`` cells along each edge. Why ``MARGIN`` is 2: the last 3x3
    convolution's padding reaches its first and last cell, and through it the second cell sees the
    previous stride-2 convolution's padded first (or, for an odd size, last) cell; nothing deeper
    (``test_the_inner_map_does_not_see_the_padding``)."""
    return maps[:, :, margin : maps.shape[2] - margin, margin : maps.shape[3] - margin] if margin else maps


def outer(inner_map: torch.Tensor, margin: int = MARGIN) -> torch.Tensor:
    """A (H, W) map of the inner cells back on the whole map's grid, 0 on the margin."""
    return F.pad(inner_map, (margin,) * 4)


def pool_mean(scores: torch.Tensor) -> torch.Tensor:
    return scores.mean(dim=(2, 3))


def pool_lse(scores: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.exp(torch.clamp(scores, max=CLAMP)).mean(dim=(2, 3)))


def pool_topk(scores: torch.Tensor) -> torch.Tensor:
    """(N, 2): the mean of the ``TOPK`` highest scores (the slide logit), and the mean over all
    positions of softplus(score) (the mean loss of calling every position lesion-free). The map
    must have at least ``TOPK`` positions (a slide of at least 64 x 64 px)."""
    top = scores.flatten(2).topk(TOPK, dim=-1).values.mean(-1)
    return torch.cat([top, F.softplus(scores).mean(dim=(2, 3))], 1)


POOLS = {"mean": pool_mean, "lse": pool_lse, "topk": pool_topk}


class SlideNet(nn.Module):
    """A whole slide in, one logit out (positive = lesion present), pooled over the inner map
    (``margin`` cells along each edge left out)."""

    def __init__(self, pool: str = "lse", widths=WIDTHS, margin: int = MARGIN):
        super().__init__()
        self.map = ScoreMap(widths)
        self.pool, self.margin = POOLS[pool], margin

    def forward(self, x):
        return self.pool(inner(self.map(x), self.margin))

    @property
    def evidence(self) -> nn.Module:
        return self.map

    def readout(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slide logit and heatmap (the sigmoid of each place's score, 0 on the margin) from the
        score map."""
        scores = inner(scores, self.margin)
        return self.pool(scores)[:, :1], outer(torch.sigmoid(scores)[0, 0], self.margin)


class Gate(nn.Module):
    """Gated attention logits (Ilse et al., 2018) at every position: w(tanh(V h) * sigmoid(U h))."""

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.v, self.u, self.w = nn.Conv2d(dim, hidden, 1), nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, 1, 1)

    def forward(self, h):
        return self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h)))


class AttentionSlideNet(nn.Module):
    """Whole-slide attention-MIL: features at every 16 px, softmax attention over all positions,
    the attention-weighted feature mean, a linear head. One logit per slide. Attention covers the
    inner map only (``margin``)."""

    def __init__(self, widths=WIDTHS, margin: int = MARGIN):
        super().__init__()
        self.map = ScoreMap(widths)
        self.gate, self.margin = Gate(widths[-1]), margin

    def forward(self, x):
        h = inner(self.map.features(x), self.margin)
        a = self.gate(h)
        pooled = torch.softmax(a.flatten(2), -1) @ h.flatten(2).transpose(1, 2)  # (N, 1, C), streamed
        return F.linear(pooled, self.map.score.weight.flatten(1), self.map.score.bias).reshape(-1, 1)

    @property
    def evidence(self) -> nn.Module:
        return _Evidence(self)

    def readout(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slide logit and heatmap (the attention weights over their maximum, 0..1) from the maps
        [attention logits, scores]: with a linear head the logit is the attention-weighted mean of
        the score map; 0 on the margin."""
        maps = inner(maps, self.margin)
        weights = torch.softmax(maps[:, :1].flatten(2), -1)
        logit = (weights * maps[:, 1:].flatten(2)).sum(-1)
        return logit, outer((weights / weights.max()).view_as(maps[:, :1])[0, 0], self.margin)


class _Evidence(nn.Module):
    """The attention logits and the score map of an ``AttentionSlideNet``, one 2-channel map."""

    def __init__(self, net: AttentionSlideNet):
        super().__init__()
        self.net = net

    def forward(self, x):
        h = self.net.map.features(x)
        return torch.cat([self.net.gate(h), self.net.map.score(h)], 1)


def build(pool: str = "lse", seed: int = 0, margin: int = MARGIN) -> nn.Module:
    """The network with BatchNorm frozen (running statistics), so it tiles while training;
    ``pool``: ``mean``, ``lse``, ``topk`` or ``attention`` (whole-slide attention-MIL); ``margin``:
    the score-map cells along each edge that pooling leaves out (0 for patches: a 32-64 px patch's
    map has only 2-4 cells a side, and a patch classifier scores the whole patch)."""
    torch.manual_seed(seed)
    model = AttentionSlideNet(margin=margin) if pool == "attention" else SlideNet(pool, margin=margin)
    bp.freeze_batchnorm(model)
    return model.train()


def calibrate_batchnorm(model: nn.Module, images) -> nn.Module:
    """Set every BatchNorm's running statistics to those of the trunk's activations on ``images``
    (a data-dependent initialisation; the layers stay frozen afterwards).

    Why: frozen at their initial statistics (mean 0, variance 1) the BatchNorms normalise nothing,
    the trunk's activations shrink layer by layer and the score map starts almost constant: every
    pooling then acts as the mean (log-sum-exp and attention's softmax of near-equal scores), and
    Adam at 2e-3 drove every ReLU of the last layer dead within an epoch (a constant network, held-out
    AUC exactly 0.5). Calibrated, the activations start at unit scale."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        nn.Module.train(m, True)  # past bp.freeze_batchnorm's hold, for these passes only
        m.reset_running_stats()
        m.momentum, saved = None, m.momentum  # a cumulative average over the images
    with torch.no_grad():
        for x in images:
            model.map.features(x)
    for m in norms:
        nn.Module.train(m, False)
        m.momentum = saved
    return model


def loss_of(out: torch.Tensor, label: int) -> torch.Tensor:
    """Binary cross-entropy of the slide logit ``out[:, 0]``; with a second column (``topk``: the mean
    per-position loss of "lesion-free"), plus that column for a negative slide."""
    logit = out[:, 0]
    loss = F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, float(label)))
    return loss + out[:, 1].mean() if out.shape[1] == 2 and not label else loss


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
