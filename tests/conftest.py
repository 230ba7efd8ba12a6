"""Test-session setup: GLUE_DIR resolved against the repository root, offline Hugging Face."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_glue = Path(os.environ.get("GLUE_DIR", "../shared/data/glue"))
os.environ["GLUE_DIR"] = str(_glue if _glue.is_absolute() else (ROOT / _glue).resolve())
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
