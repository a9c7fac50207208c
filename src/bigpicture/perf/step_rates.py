"""The rates a step is charged at: a stream op's bytes per second (normalisations reading a strided
view slower where calibrated), and the kernel family torch picks for a convolution on the CPU.
Split from ``steps.py``, which builds the steps from them."""

from __future__ import annotations

import numpy as np

from bigpicture.perf.rates import Rates, conv_backend


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


def _backend(op, shape: tuple, n: int, cin: int, cout: int, transposed: bool, rates: Rates) -> str | None:
    """The kernel family torch will run this convolution with on the CPU (`rates.conv_backend`), for an
    input box of ``shape`` (the padded box a convolution reads, a transposed convolution's input)."""
    if rates.gpu or not rates.measured:
        return None
    weight = (cin, cout // op.groups) if transposed else (cout, cin // op.groups)
    return conv_backend((n, cin) + shape, weight + tuple(op.kernel), tuple(op.step), tuple(op.dilation),
                        op.groups, transposed, rates.dtype)  # fmt: skip
