"""Ascent rules, one file each, registered by name: ``variant=<name>`` selects one (see :mod:`.base`).

A new variant: a file here with a :class:`~.base.SAM` subclass decorated ``@register("name")``, imported below,
and ``"name"`` added to ``VARIANTS`` in :mod:`lightning_deltasam.config` with its options."""

from . import friendly, gsam, looksam, wsam  # noqa: F401  (registration)
from .base import RULES, SAM, make_rule, register

__all__ = ["RULES", "SAM", "make_rule", "register"]
