"""Several devices: each tile's predicted cost, which the ranks of a group share out.

``tile_costs(plan)`` is what ``bp.tiled(model, group=...)`` hands the engine's ``Team``: the
predicted seconds of every tile, from one walk per geometry (tiles of the same geometry --
interior, edge, corner -- cost the same; ``steps.walk`` is memoised per node box), so the ranks'
contiguous shares are balanced by time rather than by count.
"""

from __future__ import annotations

from bigpicture.engine.plan import Plan
from bigpicture.errors import TilingError
from bigpicture.perf.devices import load_calibration
from bigpicture.perf.predict import resolve_device
from bigpicture.perf.rates import Rates
from bigpicture.perf.steps import walk


def tile_costs(plan: Plan) -> list[float]:
    """Predicted seconds of each of ``plan.tiles`` (forward, plus backward for a training plan).

    A plan whose device the model cannot predict (no table entry) is weighed by read-box size.
    """
    try:
        dev = resolve_device(plan.device)
    except TilingError:
        return [float(t.read.numel) for t in plan.tiles]
    dtype = plan.dtype if plan.dtype.is_floating_point else _model_dtype(plan)
    rates = Rates(dev, dtype, None if dev.name != "cpu" else load_calibration())
    memo, by_shape, costs = {}, {}, []
    for tile in plan.tiles:
        need = plan.needs(tile)
        extents = plan.split.extents
        key = tuple((n, b.shape, min(b.lo, default=0) == 0, b.hi == extents.get(n)) for n, b in need.items())
        if key not in by_shape:
            w = walk(plan.split, need, tile.writes, dtype, rates, plan.training, memo=memo)
            engine = w.nodes * (rates.train_node_s if plan.training else rates.node_s)
            by_shape[key] = w.fwd_s + (w.fwd_s + w.bwd_s if plan.training else 0.0) + engine
        costs.append(by_shape[key])
    return costs


def _model_dtype(plan: Plan):
    import torch

    model = plan.split.gm.meta.get("bigpicture_model", plan.split.gm)
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
