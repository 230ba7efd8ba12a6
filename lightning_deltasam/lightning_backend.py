"""The engine's :class:`~lightning_deltasam.engine.Backend` for a Lightning Trainer: its strategy and precision."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Optional

import lightning.pytorch as pl
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor

from .config import SAMConfig
from .distributed import default_reducer
from .engine import Backend


def grad_scaler(trainer: "pl.Trainer") -> Optional[Any]:
    """The precision plugin's GradScaler (``16-mixed``), else None."""
    return getattr(trainer.precision_plugin, "scaler", None)


class LightningBackend(Backend):
    """Backward through ``backward_fn`` (``manual_backward`` or the strategy's), DDP's no_sync from the strategy."""

    def __init__(
        self,
        trainer: "pl.Trainer",
        config: SAMConfig,
        backward_fn: Callable[[Tensor], None],
        buffers: Callable[[], list[Tensor]],
        forward_context: Optional[Callable[[], ContextManager]] = None,
    ) -> None:
        super().__init__(default_reducer(config.sync), buffers, world=default_reducer("global"))
        self.trainer = trainer
        self._backward = backward_fn
        self._forward_context = forward_context

    def backward(self, loss: Tensor) -> None:
        self._backward(loss)

    def no_sync(self) -> ContextManager:
        strategy = self.trainer.strategy
        return strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else nullcontext()

    def forward_context(self) -> ContextManager:
        return self._forward_context() if self._forward_context is not None else nullcontext()

    def loss_scale(self) -> float:
        scaler = grad_scaler(self.trainer)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def skip(self, params: list[Tensor], base_step: Callable[[], Any]) -> None:
        if grad_scaler(self.trainer) is None:
            return super().skip(params, base_step)
        # A GradScaler must see a non-finite gradient to skip the step and back off its scale.
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            grads = [params[0].new_zeros(params[0].shape)]
            params[0].grad = grads[0]
        if all(bool(g.isfinite().all()) for g in grads):
            grads[0].view(-1)[0] = float("nan")
        base_step()
