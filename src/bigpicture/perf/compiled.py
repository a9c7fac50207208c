"""Predictions for compiled tiles: ``bp.tiled(model, compile=True)``, ``make_plan(..., compile=True)``.

The plan is the same (the same tiles); its predictor runs the performance model with inductor's
fusion (``perf.fusion``, whose docstring states the assumption and its source).
"""

from __future__ import annotations

from dataclasses import replace

from bigpicture.engine.plan import Plan
from bigpicture.perf.fusion import ASSUMPTION
from bigpicture.perf.predict import predict


def predict_compiled(plan: Plan):
    """``plan``'s prediction with its tiles compiled (perf.fusion's assumption)."""
    p = predict(plan, shared={"fused": True})
    return p.with_note(f"{plan.note}; {ASSUMPTION}" if plan.note else ASSUMPTION)


def compiled_plan(plan: Plan) -> Plan:
    """``plan`` (and its earlier passes) predicted as compiled tiles; the tiles are the same."""
    earlier = tuple(replace(e, predictor=predict_compiled) for e in plan.earlier)
    return replace(plan, predictor=predict_compiled, earlier=earlier)
