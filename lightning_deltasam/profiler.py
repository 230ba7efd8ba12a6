"""Profiler ranges of the step: ``deltasam.<phase>`` while a profiler records, nothing otherwise."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def phase(name: str) -> AbstractContextManager:
    """A ``deltasam.<name>`` profiler range while a profiler records; otherwise nothing (no cost)."""
    return (
        torch.profiler.record_function(f"deltasam.{name}") if torch._C._autograd._profiler_enabled() else nullcontext()
    )
