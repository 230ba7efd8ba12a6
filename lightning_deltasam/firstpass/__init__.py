"""First-pass weightings, one file each, registered by name: the config's ``estimator`` under ``reweight='delta'``
selects one, ``"uniform"`` (SAM) otherwise (see :mod:`.base`).

A new weighting: a file here with a :class:`~.base.Weighting` subclass decorated ``@register("name")``, imported
below, and ``"name"`` added to ``ESTIMATORS`` in :mod:`lightning_deltasam.config`."""

from . import gram, probes, uniform  # noqa: F401  (registration)
from .base import WEIGHTINGS, FirstPass, Weighting, register, weighting_name

__all__ = ["WEIGHTINGS", "FirstPass", "Weighting", "register", "weighting_name"]
