"""First-pass weightings, one file each: a weighting's options (a
:class:`~lightning_deltasam.options.WeightingOptions` dataclass, ``SAMConfig(reweight=...)``) and the weighting they
select, registered together; ``reweight=None`` is SAM's uniform weights (see :mod:`.base`).

A new weighting is one file here: its options dataclass (``class XWeights(DeltaWeights, name="x")``), a
:class:`~.base.Weighting` subclass decorated ``@register(XWeights)``, and its import below."""

from . import gram, probes, uniform  # noqa: F401  (registration)
from .base import WEIGHTINGS, FirstPass, Weighting, register
from .gram import GramWeights
from .probes import ProbeWeights

__all__ = ["WEIGHTINGS", "FirstPass", "GramWeights", "ProbeWeights", "Weighting", "register"]
