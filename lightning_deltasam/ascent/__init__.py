"""Ascent rules, one file each: a rule's options (a :class:`~lightning_deltasam.options.VariantOptions` dataclass,
``SAMConfig(variant=...)``) and the rule they build, registered together (see :mod:`.base`).

A new variant is one file here: its options dataclass (``class XOptions(VariantOptions, name="x")``), a
:class:`~.base.SAM` subclass decorated ``@register(XOptions)``, and its import below."""

from . import friendly, gsam, looksam, wsam  # noqa: F401  (registration)
from .base import RULES, SAM, SAMOptions, make_rule, register
from .friendly import FriendlySAMOptions
from .gsam import GSAMOptions
from .looksam import LookSAMOptions
from .wsam import WSAMOptions

__all__ = [
    "RULES",
    "SAM",
    "FriendlySAMOptions",
    "GSAMOptions",
    "LookSAMOptions",
    "SAMOptions",
    "WSAMOptions",
    "make_rule",
    "register",
]
