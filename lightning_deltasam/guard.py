"""What keeps a bad batch from moving w: the finite check every rank agrees on, the skip, the base step and the
step count (:class:`Guard`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from .backend import Backend
from .distributed import local_tensors
from .profiler import phase
from .restore import clear_grads
from .stats import StepStats


class Rule(Protocol):
    """What the guard needs of the ascent rule: its pending values (checked finite, committed after the base step
    or discarded on a skip)."""

    def pending_tensors(self) -> list[Tensor]: ...

    def after_step(self, param_groups: list[dict[str, Any]]) -> None: ...

    def discard(self) -> None: ...


class Guard:
    """What keeps a bad batch from moving w: the finite check every rank agrees on, the skip, the base step and the
    step count. ``rule`` is the ascent rule (its pending values are checked too and committed after the base step)."""

    def __init__(self, rule: Rule, param_groups: list[dict[str, Any]]) -> None:
        self.rule, self.param_groups = rule, param_groups
        self.steps = 0  # optimizer steps taken (skips included): the rule's step index
        self.skipped_steps = 0
        self._warned = False

    def finish(
        self,
        params: list[Tensor],
        stats: StepStats,
        backend: Backend,
        base_step: Callable[[], Any],
        loss: Tensor | None,
    ) -> StepStats:
        """The base step on the descent gradient, unless it or ``loss`` (the descent loss) is non-finite (a skip)."""
        with phase("finite_check"):
            grads = local_tensors([p.grad for p in params if p.grad is not None]) + self.rule.pending_tensors()
            total = torch.stack(torch._foreach_norm(grads)).float().sum() if grads else torch.zeros(())
            if loss is not None:  # NaN / inf in the loss stays NaN: one check, one sync
                total = total + loss.detach().float().sum() * 0.0
            finite = self.agree_finite(bool(torch.isfinite(total)), backend)
        if not finite:
            return self.skip_step(params, stats, backend, base_step, "the descent pass")
        with phase("base_step"):
            base_step()
            self.rule.after_step(self.param_groups)  # WSAM's decoupled update; the rule's state is committed
        self.steps += 1
        return stats

    def agree_finite(self, finite: bool, backend: Backend) -> bool:
        """Whether every rank found its values finite (so all ranks skip together, whatever ``sync``)."""
        if backend.world.world_size == 1:
            return finite
        device = self.param_groups[0]["params"][0].device
        flag = backend.world.sum_(torch.tensor([0.0 if finite else 1.0], device=device))
        return float(flag.item()) == 0.0

    def skip_step(
        self, params: list[Tensor], stats: StepStats, backend: Backend, base_step: Callable[[], Any], where: str
    ) -> StepStats:
        """A counted step that changes nothing (the base step runs without gradients); warned once."""
        self.skipped_steps += 1
        stats.skipped = True
        if not self._warned:
            warnings.warn(
                f"delta-SAM skipped a step: non-finite loss or gradient in {where}. The weights were left "
                "unchanged; skipped steps are counted in 'deltasam/skipped_steps' (warned once).",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned = True
        backend.skip(params, base_step)
        self.rule.discard()
        self.steps += 1
        clear_grads(params)
        return stats
