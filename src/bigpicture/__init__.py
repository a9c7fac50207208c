"""bigpicture: exact tiled training and inference of ordinary PyTorch networks on huge images.

The public face: ``tiled`` composes the engine (``bigpicture.engine``: capture, split, regions,
plan, execute) and the performance model and planner (``bigpicture.perf``). See ARCHITECTURE.md.
"""

from bigpicture.engine import rules
from bigpicture.engine.batchnorm import freeze_batchnorm
from bigpicture.engine.box import Box
from bigpicture.engine.plan import Plan, Tile
from bigpicture.engine.rules import register_pointwise
from bigpicture.errors import TilingError
from bigpicture.onnx import from_onnx
from bigpicture.perf.predict import Prediction, predict
from bigpicture.perf.schedule import choose_tile, make_plan
from bigpicture.tiled import Tiled, tiled

__all__ = [
    "Box", "Plan", "Prediction", "Tile", "Tiled", "TilingError",
    "choose_tile", "freeze_batchnorm", "from_onnx", "make_plan", "predict", "register_pointwise", "rules",
    "tiled",
]  # fmt: skip
__version__ = "0.1.0"
