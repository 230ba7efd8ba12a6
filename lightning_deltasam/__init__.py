"""lightning-deltasam: sharpness-aware minimization with dynamic reweighting for PyTorch Lightning.

``DeltaSAM``, ``SAMConfig`` and the engine need only PyTorch; ``DeltaSAMMixin`` and ``DeltaSAMCallback``
import Lightning when first used (lazy attributes). The GLUE training app is :mod:`lightning_deltasam.glue`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .ascent import (
    ESAMOptions,
    FriendlySAMOptions,
    GSAMOptions,
    LookSAMOptions,
    MESAOptions,
    MomentumSAMOptions,
    SAMOptions,
    WSAMOptions,
)
from .config import SAMConfig
from .engine import SAMEngine
from .firstpass import GramWeights, ProbeWeights
from .optim import DeltaSAM
from .stats import StepStats

if TYPE_CHECKING:
    from .callback import DeltaSAMCallback
    from .mixin import DeltaSAMMixin

_LAZY = {"DeltaSAMCallback": ".callback", "DeltaSAMMixin": ".mixin"}

__all__ = [
    "DeltaSAM",
    "DeltaSAMCallback",
    "DeltaSAMMixin",
    "ESAMOptions",
    "FriendlySAMOptions",
    "GSAMOptions",
    "GramWeights",
    "LookSAMOptions",
    "MESAOptions",
    "MomentumSAMOptions",
    "ProbeWeights",
    "SAMConfig",
    "SAMEngine",
    "SAMOptions",
    "StepStats",
    "WSAMOptions",
]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
