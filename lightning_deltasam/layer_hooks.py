"""Hooks over a model's layers, built once per module and parameter set (:class:`LayerHooks`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn


class LayerHooks:
    """Hooks over a model's layers (the Gram capture, the per-instance route), built once per module and parameter
    set by ``build(module, params)`` and reused while neither changes."""

    def __init__(self, build: Callable[[nn.Module, list[Tensor]], Any]) -> None:
        self.build = build
        self._cached: tuple[tuple[int, ...], Any] | None = None

    def get(self, module: nn.Module | None, params: list[Tensor], option: str) -> Any:
        if module is None:
            raise ValueError(
                f"{option} hooks the model's layers: pass the model (DeltaSAM(..., module=model)); "
                "DeltaSAMMixin and DeltaSAMCallback pass it themselves."
            )
        key = (id(module), *(id(p) for p in params))
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self.build(module, params))
        return self._cached[1]
