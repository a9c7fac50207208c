"""Rates that count bytes only: a walk with them gives a tile's memory without its time.

Memory bounds and least-memory tiles walk many steps whose times nobody reads; every rate answered
with 1 and no CPU backend asked of torch (``conv_rates.backends_of``) keeps the same byte counts
(the workspace is the rates' own) for a fraction of the cost. Split from walk.py (the module budget).
"""

from __future__ import annotations

import numpy as np

from bigpicture.perf.rates import Rates


class _BytesOnly:
    """``rates`` that answer every rate with 1 and pick no backend: a walk with them counts the same
    bytes (the workspace is the rates' own) for a fraction of the cost, for memory bounds."""

    measured = False  # no CPU backend asked of torch (conv_rates.backends_of)

    def __init__(self, rates: Rates) -> None:
        self._rates = rates

    def __getattr__(self, name: str):
        return getattr(self._rates, name)

    def conv(self, *args, **kwargs) -> float:
        return 1.0

    def convs(self, nd: int, fan_in: int, cout: int, positions: list, *args) -> list:
        return [1.0] * len(positions)

    def pool(self, *args, **kwargs) -> float:
        return 1.0

    def stream(self, *args, **kwargs) -> float:
        return 1.0

    def streams(self, kind: str, nbytes, backward: bool = False) -> np.ndarray:
        return np.ones(np.shape(nbytes))


def bytes_only(rates: Rates) -> _BytesOnly:
    """The byte-counting stand-in of ``rates`` (``_BytesOnly``), one per rates."""
    if "_bytes_only" not in rates.__dict__:
        rates.__dict__["_bytes_only"] = _BytesOnly(rates)
    return rates.__dict__["_bytes_only"]
