"""DeltaSAM's backend under a ``torch.amp.GradScaler``: both passes scaled, unscaled before the rule and the
base step, and either pass's overflow recorded for ``scaler.update()``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .backend import Backend
from .distributed import local_tensor
from .restore import clear_grads


class ScalerBackend(Backend):
    """A GradScaler around the engine's step (``DeltaSAM(..., grad_scaler=scaler)``): the engine's own backwards
    are scaled; the first gradient is divided by the scale before eps is formed; the descent gradient is unscaled
    by ``scaler.unscale_`` (which records its inf check); a skipped step makes the scaler see an overflow, so
    ``scaler.update()`` lowers the scale whichever pass overflowed. ``scaled``: False when the caller already
    called ``scaler.unscale_`` on the descent gradient."""

    def __init__(self, base: Backend, scaler: torch.amp.GradScaler, optimizer: Optimizer, scaled: bool) -> None:
        super().__init__(base.reducer, base._buffers, base.world)
        self.scaler, self.optimizer, self.scaled = scaler, optimizer, scaled
        self._scale: float | None = None

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def loss_scale(self) -> float:
        if self._scale is None:
            self._scale = float(self.scaler.get_scale())
        return self._scale

    def unscale_ascent_(self, grads: list[Tensor]) -> None:
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.loss_scale())

    def unscale_descent_(self) -> None:
        if self.scaled:
            self._record()

    def _record(self) -> None:
        """``scaler.unscale_(optimizer)``: unscales ``.grad`` and records its inf check for ``scaler.update()``;
        nothing if the caller already called it this step (torch refuses a second call)."""
        try:
            self.scaler.unscale_(self.optimizer)
        except RuntimeError as err:
            if "already been called" not in str(err):
                raise

    def skip(self, params: list[Tensor], base_step: Callable[[], Any]) -> None:
        # the scaler lowers its scale only if its inf check sees an overflow: a NaN in one gradient, then the check
        if params[0].grad is None:
            params[0].grad = torch.zeros_like(params[0])
        local_tensor(params[0].grad).view(-1)[:1] = float("nan")
        if self.scaled:
            self._record()
        clear_grads(params)
        base_step()
