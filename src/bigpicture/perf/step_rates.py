"""The rates a step is charged at: a stream op's bytes per second (normalisations reading a strided
view slower where calibrated; a convolution's: ``conv_rates.py``). Split from ``steps.py``, which
builds the steps from them."""

from __future__ import annotations

import numpy as np

from bigpicture.perf.rates import Rates


def _rates(rates: Rates, kind: str, nbytes: np.ndarray, strided: np.ndarray | None, backward: bool = False):
    """``rates.streams``; a normalisation's rows that read a strided view at that rate (measured
    here 2.0-2.3x slower forward and backward, PyTorch's generic kernel) where it was calibrated.
    ``strided`` None: the faster of the two (a lower bound of either: ``bound.py``)."""
    rate = rates.streams(kind, nbytes, backward)
    ops = {} if rates.gpu else rates.ops or {}
    tables = ops.get("stream_backward" if backward else "stream")
    if kind == "norm" and (strided is None or strided.any()) and "norm_strided" in (tables or {}):
        other = rates.streams("norm_strided", nbytes, backward)  # older calibrations lack it
        rate = np.maximum(rate, other) if strided is None else np.where(strided, other, rate)
    return rate


def _per_byte(nbytes: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """Seconds to move ``nbytes`` at ``rate`` bytes/s, 0 where nothing moves."""
    return np.divide(nbytes, rate, out=np.zeros(len(nbytes)), where=nbytes > 0)
