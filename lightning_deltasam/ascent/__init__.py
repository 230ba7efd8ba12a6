"""Ascent rules, one file each: a rule's options (a :class:`~lightning_deltasam.options.VariantOptions` dataclass,
``SAMConfig(variant=...)``) and the rule they build, registered together (see :mod:`.base`).

A new variant is one file here: its options dataclass (``class XOptions(VariantOptions, name="x")``) and a
:class:`~.base.SAM` subclass decorated ``@register(XOptions)``; every module of this package is imported below,
which registers it."""

import importlib
import pkgutil

from .base import RULES, SAM, SAMOptions, make_rule, register
from .esam import ESAMOptions
from .friendly import FriendlySAMOptions
from .gsam import GSAMOptions
from .looksam import LookSAMOptions
from .mesa import MESAOptions
from .msam import MomentumSAMOptions
from .wsam import WSAMOptions

for _module in pkgutil.iter_modules(__path__):  # registration: each rule's file registers its options and rule
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "RULES",
    "SAM",
    "ESAMOptions",
    "FriendlySAMOptions",
    "GSAMOptions",
    "LookSAMOptions",
    "MESAOptions",
    "MomentumSAMOptions",
    "SAMOptions",
    "WSAMOptions",
    "make_rule",
    "register",
]
