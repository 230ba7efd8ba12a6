"""lightning-deltasam: sharpness-aware minimization with dynamic reweighting for PyTorch Lightning."""

from .callback import DeltaSAMCallback
from .config import SAMConfig
from .engine import SAMEngine, StepStats
from .mixin import DeltaSAMMixin
from .optim import DeltaSAM

__all__ = ["DeltaSAM", "DeltaSAMCallback", "DeltaSAMMixin", "SAMConfig", "SAMEngine", "StepStats"]
__version__ = "0.1.0"
