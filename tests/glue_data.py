"""Where the tests find the real GLUE data: the ``GLUE_DIR`` environment variable (see tests/conftest.py).

Unset: the tests that need the data skip, and the skip reason says to set ``GLUE_DIR``. Set: they run, and
fail if the files are not there (CI sets it, so CI never skips them).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

GLUE_DIR: Path | None = Path(os.environ["GLUE_DIR"]) if os.environ.get("GLUE_DIR") else None
SKIP_REASON = "needs the GLUE data: set GLUE_DIR to the folder holding SST-2/, CoLA/, ... (official GLUE layout)"
needs_glue = pytest.mark.skipif(GLUE_DIR is None, reason=SKIP_REASON)
