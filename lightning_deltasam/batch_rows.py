"""Rows of a collated batch (ESAM's second pass on chosen instances): every tensor whose first dimension is the
batch size, indexed along it, inside mappings, lists and tuples; anything else kept as it is."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def select_rows(batch: Any, rows: Tensor, size: int) -> Any:
    """``batch`` restricted to ``rows`` (indices into its ``size`` instances). A DataLoader's default collation
    stacks every field along dim 0, so each field with ``size`` rows is indexed; a batch laid out otherwise (a
    field whose first dimension is B by coincidence, instances along another dimension) needs its own selection
    (``DeltaSAMMixin.select_instances``). Refused when no field has ``size`` rows."""
    found: list[bool] = []
    out = _select(batch, rows, size, found)
    if not found:
        raise ValueError(
            f"select_instances: no tensor in the batch ({type(batch).__name__}) has the batch's {size} rows along "
            "dim 0, so the chosen instances cannot be taken from it. Override select_instances(batch, instances) "
            "on the module to return the batch of those instances."
        )
    return out


def _select(value: Any, rows: Tensor, size: int, found: list[bool]) -> Any:
    if isinstance(value, Tensor):
        if value.dim() >= 1 and value.shape[0] == size:
            found.append(True)
            return value[rows.to(value.device)]
        return value
    if isinstance(value, Mapping):
        selected = {k: _select(v, rows, size, found) for k, v in value.items()}
        try:
            return type(value)(selected)  # type: ignore[call-arg]
        except TypeError:
            return selected
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_select(v, rows, size, found) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_select(v, rows, size, found) for v in value)
    return value
