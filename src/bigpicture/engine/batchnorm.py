"""BatchNorm in the engine: ``freeze_batchnorm`` keeps its running statistics, which makes it local."""

from __future__ import annotations

from torch import nn


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Keep every BatchNorm layer in eval mode (running statistics), even after ``model.train()``.

    Their affine parameters still train. This is what makes a network with BatchNorm tileable
    during training: train-mode BatchNorm normalises with whole-image statistics.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.train = _stay_in_eval.__get__(m)
    return model


def _stay_in_eval(self, mode: bool = True):
    return nn.Module.train(self, False)
