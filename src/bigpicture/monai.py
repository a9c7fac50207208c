"""``TiledInferer``: MONAI's ``SlidingWindowInferer`` replaced in one line, with exact results.

    inferer = SlidingWindowInferer(roi_size=(256, 256), overlap=0.25)   # blends overlapping windows
    inferer = TiledInferer(tile=256)                                    # the untiled network's output
    pred = inferer(inputs, network)

Where a sliding window runs the network on overlapping windows and blends their outputs (seams
averaged away, never removed), ``bp.tiled`` gives each tile the input its outputs need (its halo),
so the result is the network's own on the whole image. The MONAI conventions are kept: a
``MetaTensor`` in gives a ``MetaTensor`` out with the input's metadata (affine, meta dict), a
network that returns a dict, tuple or list of outputs gives the same structure, ``sw_device`` is
where the tiles run and ``device`` where the output lives. MONAI is an optional extra.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type
from torch import nn

from bigpicture.tiled import Tiled, tiled


class TiledInferer(Inferer):
    """``inferer(inputs, network, *args)``: ``network(inputs, *args)``, computed tile by tile.

    ``tile``: the input extent each tile owns (one int or one per spatial dimension), or ``memory``:
    a budget (``"4GiB"``) for which the planner picks the fastest tile; see ``bp.tiled``.
    ``progress``: a progress bar over the tiles (tqdm). ``sw_device``: where the tiles run, which is
    where the network's parameters are (given, it must agree: the network is not moved behind your
    back). ``device``: where the output lives (default: the input's device); the input stays where it
    is and each tile's read box is moved to ``sw_device``.
    """

    def __init__(self, tile=None, memory=None, progress: bool = False, sw_device=None, device=None) -> None:
        super().__init__()
        self.tile, self.memory, self.progress = tile, memory, progress
        self.sw_device = None if sw_device is None else torch.device(sw_device)
        self.device = None if device is None else torch.device(device)
        self._cached: tuple[nn.Module, Tiled] | None = None  # the last network's wrapper: its plans

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any):
        if kwargs:
            raise TypeError(
                f"TiledInferer passes positional arguments to the network, not keywords "
                f"({', '.join(kwargs)}): wrap the network in an nn.Module whose forward sets them."
            )
        net = self.tiled(network)
        self._check_device(network)
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs  # tiles are plain tensors
        plain = [a.as_tensor() if isinstance(a, MetaTensor) else a for a in args]
        return _map_tensors(net(x, *plain), lambda y: self._to_output(y, inputs))

    def tiled(self, network: nn.Module) -> Tiled:
        """The ``bp.tiled`` wrapper of ``network``, kept while the same network is used (its plans too).

        One network at a time: the wrapper holds its network, so a cache of every network ever
        passed would keep them all alive (an evaluator calls with one network throughout)."""
        if not isinstance(network, nn.Module):
            raise TypeError(
                f"TiledInferer needs the network as an nn.Module (it captures its graph), got "
                f"{type(network).__name__}: for a function such as `lambda x: model(x, cfg)`, write an "
                "nn.Module that owns `model` and calls it so in its forward."
            )
        if self._cached is None or self._cached[0] is not network:
            net = tiled(network, tile=self.tile, memory=self.memory, progress=self.progress)
            self._cached = (network, net)
        return self._cached[1]

    def _check_device(self, network: nn.Module) -> None:
        p = next(network.parameters(), None)
        here = p.device if p is not None else torch.device("cpu")
        if self.sw_device is not None and not _same(self.sw_device, here):
            raise ValueError(
                f"TiledInferer(sw_device={self.sw_device}) but the network's parameters are on {here}: tiles "
                f"run where the network is. Call network.to({str(self.sw_device)!r}) first."
            )

    def _to_output(self, y: torch.Tensor, inputs) -> torch.Tensor:
        device = self.device if self.device is not None else y.device
        if isinstance(inputs, MetaTensor):  # MONAI's own conversion: the input's metadata, on `device`
            return convert_to_dst_type(y, inputs, device=device)[0]
        return y.to(device)

    def __repr__(self) -> str:
        budget = f"memory={self.memory!r}" if self.memory is not None else f"tile={self.tile!r}"
        return f"TiledInferer({budget}, sw_device={self.sw_device}, device={self.device})"


def _same(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one (``cuda`` and ``cuda:0`` are, when 0 is the current device)."""
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def _map_tensors(out, fn):
    """``out`` with ``fn`` applied to every tensor, its dict, tuple or list structure kept."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, dict):  # torch.fx hands back its immutable_dict: a plain dict, as the network's
        return {k: _map_tensors(v, fn) for k, v in out.items()}
    if hasattr(out, "_fields"):  # a named tuple
        return type(out)(*(_map_tensors(v, fn) for v in out))
    if isinstance(out, (tuple, list)):
        return (tuple if isinstance(out, tuple) else list)(_map_tensors(v, fn) for v in out)
    return out
