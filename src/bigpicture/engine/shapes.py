"""Shortcuts for shape propagation: the layers networks repeat, without FakeTensor's per-op cost.

FakeTensor runs each op through Python, whatever the input size: about 5 ms for a convolution and
26 ms for an eval-mode BatchNorm (decomposed into some forty primitives). DenseNet121's 427 nodes
took 3-7 s that way. Two shortcuts give the same shape, dtype and strides for a fraction of that:

    same shape  norms, activations, dropout: the output is ``empty_like(x)``, once the layer's own
                input checks pass (channels, dimensions) and its tensors have x's dtype
    on meta     convolutions, pooling, linear layers, resampling: the layer's own forward on meta
                tensors (its parameters swapped for meta copies), whose kernels are C++

Anything else, or a shortcut whose conditions do not hold or that raises, returns None and the
node runs on fake tensors as before (its errors name the node). ``tests/test_shapes.py`` checks
that both give every node of the census networks the same shape and dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.func import functional_call

# fmt: off
_SAME_SHAPE = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.GroupNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_ON_META = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Linear, nn.Upsample, nn.Flatten,
)
# fmt: on


def shortcut(module: nn.Module, args: tuple, kwargs: dict):
    """The fake output of ``module(*args, **kwargs)`` by a shortcut, or None where none applies."""
    x = args[0] if len(args) == 1 and not kwargs else None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or not _dtypes_agree(module, x):
        return None
    if _autocast():  # it casts by op and device (not on meta tensors): fake tensors follow it
        return None
    if type(module) in _SAME_SHAPE:  # exact types: a subclass may change its forward
        return torch.empty_like(x) if _accepts(module, x) else None
    if type(module) in _ON_META and x.is_contiguous():  # else fake tensors pick the output's layout
        return _on_meta(module, x)
    return None


def _autocast() -> bool:
    kinds = [t for t in ("cpu", "cuda", "xpu", "mps") if torch.amp.is_autocast_available(t)]
    return any(torch.is_autocast_enabled(t) for t in kinds)


def _dtypes_agree(module: nn.Module, x: torch.Tensor) -> bool:
    """Mixed dtypes promote or fail by rules a shortcut does not repeat: those run on fake tensors."""
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return all(t.dtype == x.dtype for t in tensors if t.is_floating_point())


def _accepts(module: nn.Module, x: torch.Tensor) -> bool:
    """The checks the layer's own forward makes of its input (channels, dimensions, batch)."""
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        if module.training or x.dim() < 2 or x.shape[1] != module.num_features:
            return False  # train-mode checks (more than one value per channel) run on fake tensors
        if type(module) is not nn.SyncBatchNorm:
            try:
                module._check_input_dim(x)
            except ValueError:
                return False
        return True
    if isinstance(module, nn.GroupNorm):
        return x.dim() >= 2 and x.shape[1] == module.num_channels
    if isinstance(module, nn.PReLU):
        return module.weight.numel() == 1 or (x.dim() >= 2 and x.shape[1] == module.weight.numel())
    return True


def _on_meta(module: nn.Module, x: torch.Tensor):
    """The layer's forward on meta tensors, its output made a fake tensor again. The output's shape,
    strides and dtype are kept by the layer's settings and the input's (``_meta_key``): a deep
    network repeats a few layers on a few shapes (SENet154's 3D convolutions: 300 calls, ~50 kinds)."""
    key = _meta_key(module, x)
    found = _META.get(key, _MISSING) if key is not None else _MISSING
    if found is _MISSING:
        found = _meta_output(module, x)
        if key is not None:
            if len(_META) >= 4096:
                _META.pop(next(iter(_META)))
            _META[key] = found
    if found is None:
        return None
    shape, stride, dtype = found
    return torch.empty_strided(shape, stride, dtype=dtype, device=x.device)


def _meta_output(module: nn.Module, x: torch.Tensor):
    """(shape, strides, dtype) of the layer's output on meta tensors, or None where it fails."""
    with unset_fake_temporarily():
        meta = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
        tensors = {
            name: t.to("meta")
            for name, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
        }
        try:
            out = functional_call(module, tensors, (meta,))
        except Exception:  # the layer fails, or has no meta kernel: fake tensors say which
            return None
    if not isinstance(out, torch.Tensor):
        return None
    return tuple(out.shape), out.stride(), out.dtype


_META: dict = {}
_MISSING = object()
_HOOKS = (
    "_backward_hooks", "_backward_pre_hooks", "_forward_hooks", "_forward_hooks_always_called",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
)  # fmt: skip
_KEPT = {  # a module's own bookkeeping: its tensors are keyed on their own, its hooks must be none
    "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_is_full_backward_hook",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
    *_HOOKS,
}  # fmt: skip
_PLAIN = (int, float, bool, str, type(None), torch.dtype)


def _meta_key(module: nn.Module, x: torch.Tensor):
    """What the layer's output on meta tensors is a function of: its exact type, every attribute
    (plain values only), its tensors' shapes, strides and dtypes, the input's. None where that is
    not known: a hook (its own or a global one), or an attribute of another kind."""
    if any(getattr(module, h) for h in _HOOKS) or any(
        getattr(nn.modules.module, "_global" + h, None) for h in _HOOKS
    ):
        return None
    attrs = []
    for name, value in vars(module).items():
        if name in _KEPT:
            continue
        value = _frozen(value)
        if value is _MISSING:
            return None
        attrs.append((name, value))
    tensors = tuple(
        (name, tuple(t.shape), t.stride(), t.dtype)
        for name, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
    )
    return type(module), tuple(attrs), tensors, tuple(x.shape), x.stride(), x.dtype


def _frozen(value):
    """A plain value, or a tuple or list of them, as a hashable one with its type (True is not 1
    here, nor 2.0 2); ``_MISSING`` for anything else."""
    if type(value) in _PLAIN:
        return type(value), value
    if type(value) in (tuple, list, torch.Size):
        items = tuple(_frozen(v) for v in value)
        return _MISSING if any(v is _MISSING for v in items) else (type(value), items)
    return _MISSING
