"""Test-session setup: GLUE_DIR resolved against the repository root (when set), offline Hugging Face."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("GLUE_DIR"):
    _glue = Path(os.environ["GLUE_DIR"])
    os.environ["GLUE_DIR"] = str(_glue if _glue.is_absolute() else (ROOT / _glue).resolve())
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    """A GLUE_DIR that is set but names no folder is a mistake, not a reason to skip: stop at once."""
    glue = os.environ.get("GLUE_DIR")
    if glue and not Path(glue).is_dir():
        raise pytest.UsageError(
            f"GLUE_DIR={glue} is not a folder; point it at the GLUE data or unset it "
            "(the tests that need the data then skip)"
        )
