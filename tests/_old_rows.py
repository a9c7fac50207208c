"""``memory_bound._rows`` as it was before it made a window's padded box once per walk (commit
c286eee): the reference of tests/test_memory_rows.py, verbatim but for this docstring, the imports
and the boxes' positions counted inline (as ``_numels`` counts them)."""

from __future__ import annotations

import numpy as np

from bigpicture.engine.rules import Window
from bigpicture.engine.rules.resample import ConvTranspose, Pad
from bigpicture.engine.split import Split
from bigpicture.perf.steps import Rows, _outside, _stored, geometries, spatial_inputs, step_key


def _rows(split: Split, node, needs: list[dict], copy: bool) -> Rows:
    """The geometries of ``node``'s step in each walk, as ``steps.node_step`` makes them one at a time."""
    op, nd = split.ops[node], split.nd
    copied = [False] * len(needs)  # only windows and padding read out of the image or a sub-box
    for k, need in enumerate(needs if isinstance(op, (Window, Pad)) else ()):
        key = step_key(node, geometries(split, node, need, _stored(split, spatial_inputs(split, node, need),
                                                                    need, copy)), False)  # fmt: skip
        copied[k] = key[1] or key[2]
    boxes = [need[node] for need in needs]
    return Rows(
        np.array([b.numel for b in boxes], dtype=np.int64),
        tuple(
            (i, np.array([need[i].numel for need in needs], dtype=np.int64))
            for i in op.inputs
            if i in needs[0]
        ),
        np.array(
            [op.padded_box(b).shape if isinstance(op, Window) else (1,) * nd for b in boxes], dtype=np.int64
        ),
        np.array(
            [op.needs(b)[0].shape if isinstance(op, ConvTranspose) else (1,) * nd for b in boxes],
            dtype=np.int64,
        ),  # fmt: skip
        np.array([c and _outside(op, b) for c, b in zip(copied, boxes, strict=True)]),
        np.array(copied),
    )
