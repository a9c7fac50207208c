"""Mixed precision: the ``torch.autocast`` settings of a forward, re-entered for its recompute.

Autograd runs a Function's backward outside the forward's ``torch.autocast`` block (and may run
it inside one the forward was not in), so a tile recomputed in the backward would cast
differently from the same tile in the forward. Recording the settings at the forward and
re-entering them around the recompute, as ``torch.utils.checkpoint`` does, gives the same casts
and so the same values.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_state(device: torch.device | str) -> list[dict]:
    """The autocast settings in force now, for the CPU and ``device``: on or off, dtype, weight cache."""
    kinds = dict.fromkeys(("cpu", torch.device(device).type))
    kinds = [t for t in kinds if torch.amp.is_autocast_available(t)]
    cache = torch.is_autocast_cache_enabled()
    return [
        dict(device_type=t, dtype=torch.get_autocast_dtype(t), enabled=torch.is_autocast_enabled(t),
             cache_enabled=cache)
        for t in kinds
    ]  # fmt: skip


@contextlib.contextmanager
def autocast(state: list[dict], enabled: bool = True):
    """Run under the settings ``autocast_state`` recorded (off where they were off), or with
    ``enabled=False`` with autocast off for the same devices (the engine's own sums of gradients)."""
    with contextlib.ExitStack() as stack:
        for settings in state:
            stack.enter_context(torch.autocast(**(settings if enabled else {**settings, "enabled": False})))
        yield


def autocast_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The dtype convolutions and matmuls of a ``dtype`` input compute in on ``device`` under the
    autocast in force now: autocast's own for float32 inputs when on, else ``dtype``."""
    kind = torch.device(device).type
    on = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
    return torch.get_autocast_dtype(kind) if on and dtype == torch.float32 else dtype


@contextlib.contextmanager
def no_autocast_cache():
    """Autocast without its weight cache, for shape propagation on fake tensors.

    Inside ``torch.autocast`` the cast of a parameter is cached until the block ends; cast under
    a ``FakeTensorMode`` it would be a fake tensor, and every later real call in the same block
    would compute on it."""
    cached = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(cached)
