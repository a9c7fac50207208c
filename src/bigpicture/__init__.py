"""bigpicture: exact tiled training and inference of ordinary PyTorch networks on huge images."""

from . import rules
from .box import Box
from .errors import TilingError
from .plan import Plan, Tile, make_plan
from .predict import Prediction, predict
from .rules import register_pointwise
from .schedule import choose_tile
from .tiled import Tiled, freeze_batchnorm, tiled

__all__ = [
    "Box", "Plan", "Prediction", "Tile", "Tiled", "TilingError",
    "choose_tile", "freeze_batchnorm", "make_plan", "predict", "register_pointwise", "rules", "tiled",
]  # fmt: skip
__version__ = "0.1.0"
