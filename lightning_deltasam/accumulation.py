"""Gradient accumulation for the mixin's manual optimization: the mean of k micro-batches' descent gradients, one
optimizer step (:class:`Window`), and the backend of a micro-batch's step (:class:`MicroBatchBackend`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .lightning_backend import LightningBackend


class Window:
    """Gradient accumulation over k micro-batches: the mean of their descent gradients, one optimizer step.

    A micro-batch whose step the engine skips (non-finite) poisons the window: its step is skipped as a whole.
    """

    def __init__(self) -> None:
        self.sum: list[Tensor] | None = None
        self.count = 0
        self.poisoned = False
        self.micro_batches = 0

    def count_micro_batch(self, k: int, last_batch: bool) -> bool:
        """Count one micro-batch; whether it ends the window (every k, and at an epoch's end)."""
        self.micro_batches += 1
        if self.micro_batches % k == 0 or last_batch:
            self.micro_batches = 0
            return True
        return False

    def add(self, params: list[Tensor]) -> None:
        """The engine's base step for a micro-batch: add its descent gradient, clear ``.grad``."""
        if self.sum is None:
            self.sum = [torch.zeros_like(p) for p in params]
        self.count += 1
        with torch.no_grad():
            present = [(a, p.grad) for a, p in zip(self.sum, params) if p.grad is not None]
            if present:
                torch._foreach_add_([a for a, _ in present], [g for _, g in present])
        for p in params:
            p.grad = None

    def close(self, params: list[Tensor], backend: LightningBackend, base_step: Callable[[], Any]) -> bool:
        """The window's one optimizer step on the mean gradient (or a skipped step); whether it was skipped."""
        acc, count, poisoned = self.sum, self.count, self.poisoned
        self.sum, self.count, self.poisoned = None, 0, False
        if poisoned or acc is None:
            backend.skip(params, base_step)
            for p in params:
                p.grad = None
            return True
        with torch.no_grad():
            torch._foreach_div_(acc, float(count))
        for p, a in zip(params, acc):
            p.grad = a
        base_step()
        return False


class MicroBatchBackend(LightningBackend):
    """A micro-batch's backend: a skipped step poisons the window instead of stepping the optimizer."""

    window: Window

    def skip(self, params: list[Tensor], base_step: Callable[[], Any]) -> None:
        self.window.poisoned = True
        for p in params:
            p.grad = None
