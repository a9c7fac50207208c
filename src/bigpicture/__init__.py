"""bigpicture: exact tiled training and inference of ordinary PyTorch networks on huge images."""

from . import rules
from .box import Box
from .errors import TilingError
from .plan import Plan, Tile, make_plan
from .rules import register_pointwise
from .tiled import Tiled, freeze_batchnorm, tiled

__all__ = [
    "Box", "Plan", "Tile", "Tiled", "TilingError",
    "freeze_batchnorm", "make_plan", "register_pointwise", "rules", "tiled",
]  # fmt: skip
__version__ = "0.1.0"
