"""Layer kinds: how each kind of layer states every instance's share of its parameters' gradients (one file per
kind), and the capture that records a forward's calls and checks that they account for the whole batch."""

from .base import Call, Kind, UnsupportedModuleError
from .capture import LayerCapture, Verify
from .compiled import check_not_compiled, compiled_part
from .kinds import KINDS, SUPPORTED_TEXT
from .terms import Full, LowRank, Rows, Term

__all__ = [
    "KINDS",
    "SUPPORTED_TEXT",
    "Call",
    "Full",
    "Kind",
    "LayerCapture",
    "LowRank",
    "Rows",
    "Term",
    "UnsupportedModuleError",
    "Verify",
    "check_not_compiled",
    "compiled_part",
]
