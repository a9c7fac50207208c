"""``bp.tiled(model, tile=...)``: an ``nn.Module`` with the model's outputs and gradients, tile by tile."""

from __future__ import annotations

import torch
from torch import nn

from . import execute
from .errors import TilingError
from .plan import Plan, capture, plan_graph


class Tiled(nn.Module):
    """Wraps ``model``; ``parameters()`` are the model's own, so any optimiser works unchanged.

    Plans are made per input shape, dtype, device and train/eval state, and cached.
    """

    def __init__(self, model: nn.Module, tile=1024, progress: bool = False, multipass: bool = False) -> None:
        super().__init__()
        self.model = model
        self.tile = tile
        self.progress = progress
        self.multipass = multipass
        self._graphs: dict = {}
        self._plans: dict = {}
        self.plan: Plan | None = None
        self.report = None  # what the last `run` did (tiles computed, reused, I/O wait)

    def plan_for(self, x, *args) -> Plan:
        """The plan for input ``x``, cached by shape, dtype, device and train/eval state; runs nothing."""
        shape = tuple(x.shape)
        dtype = x.dtype if isinstance(x, torch.Tensor) else self._param_dtype()
        device, state = self._device(), tuple(m.training for m in self.model.modules())
        key = (shape, dtype, device, state, tuple(_describe(a) for a in args))
        if key not in self._plans:
            if state not in self._graphs:
                self._graphs[state] = capture(self.model, self.multipass)
            inputs = [(shape, dtype, device)] + [_fake_spec(a) for a in args]
            self._plans[key] = plan_graph(self._graphs[state], inputs, self.tile, self.multipass)
        self.plan = self._plans[key]
        return self.plan

    def forward(self, x, *args):
        plan = self.plan_for(x, *args)
        progress = _progress_bar() if self.progress else None
        return execute.run(plan, (x, *args), list(self.model.parameters()), self._device(), progress)

    def run(self, src, out=None, **kwargs):
        """Inference into memory or a resumable zarr store: see ``bigpicture.inference.run``."""
        from .inference import run

        return run(self, src, out, **kwargs)

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _param_dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def extra_repr(self) -> str:
        return f"tile={self.tile}"


def tiled(model: nn.Module, tile=1024, memory=None, progress: bool = False, multipass: bool = False) -> Tiled:
    """``model`` run tile by tile: same outputs, parameter gradients and input gradients.

    ``tile`` is the input extent each tile owns, excluding its halo (an int for every spatial
    dimension, or one per dimension), rounded to the network's total stride where needed.
    ``multipass=True`` makes global ops exact (GroupNorm, InstanceNorm statistics,
    squeeze-excitation) at the cost of one more pass over the tiles per level of them.
    """
    if memory is not None:
        raise TilingError(
            "memory= needs the performance model, which is not in this version yet; give tile= instead "
            "(the input extent each tile owns, e.g. tile=1024)."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"bp.tiled expects an nn.Module, got {type(model).__name__}")
    return Tiled(model, tile, progress, multipass)


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


def _describe(a):
    return (tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else repr(a)


def _fake_spec(a):
    return (tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a


def _progress_bar():
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra
        return None
    return tqdm
