"""First-pass weightings, one file each: a weighting's options (a
:class:`~lightning_deltasam.options.WeightingOptions` dataclass, ``SAMConfig(reweight=...)``) and the weighting they
select, registered together; ``reweight=None`` is SAM's uniform weights (see :mod:`.base`).

A new weighting is one file here: its options dataclass (``class XWeights(DeltaWeights, name="x")``) and a
:class:`~.base.Weighting` subclass decorated ``@register(XWeights)``; every module of this package is imported
below, which registers it."""

import importlib
import pkgutil

from .base import WEIGHTINGS, FirstPass, Weighting, register
from .gram import GramWeights
from .probes import ProbeWeights

for _module in pkgutil.iter_modules(__path__):  # registration: each weighting's file registers itself
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["WEIGHTINGS", "FirstPass", "GramWeights", "ProbeWeights", "Weighting", "register"]
