"""How an adapter runs backward, collectives and a skipped step: the :class:`Backend` the core calls."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import Tensor

from .distributed import Reducer, default_reducer
from .restore import clear_grads


class Backend:
    """How an adapter runs backward, collectives and a skipped step. This default is plain PyTorch."""

    def __init__(
        self, reducer: Reducer, buffers: Callable[[], list[Tensor]] | None = None, world: Reducer | None = None
    ) -> None:
        self.reducer = reducer  # collectives of the step: identity under sync='local'
        self.world = world if world is not None else reducer  # every rank, whatever sync: skip agreement
        self._buffers = buffers

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def no_sync(self) -> AbstractContextManager:
        """Context in which a backward does not all-reduce gradients (DDP's no_sync)."""
        return nullcontext()

    def forward_context(self) -> AbstractContextManager:
        """Context for the engine's own forwards (autocast, where the caller's context lacks it)."""
        return nullcontext()

    def buffers(self) -> list[Tensor]:
        """Running statistics (BatchNorm and the like) that only the first pass may update."""
        return self._buffers() if self._buffers is not None else []

    def loss_scale(self) -> float:
        """Factor the backward multiplies gradients by (a GradScaler's scale), 1 without one."""
        return 1.0

    def unscale_ascent_(self, grads: list[Tensor]) -> None:
        """The first-pass gradients divided by the loss scale, in place, before the rule forms eps from them (the
        rules that keep g at w, GSAM, WSAM, FriendlySAM, need its true size). Nothing here: no scaler, or one that
        the adapter's own step unscales (Lightning's ``16-mixed``)."""

    def unscale_descent_(self) -> None:
        """The descent pass's gradients in ``.grad`` divided by the loss scale, in place, before the rule combines
        them with g (a GradScaler's ``unscale_``, which records its inf check). Nothing here, as above."""

    def skip(self, params: list[Tensor], base_step: Callable[[], Any]) -> None:
        """A step whose gradients are not finite: the base step runs with no gradient, so nothing changes
        but the step is counted (schedulers and step counters stay aligned with a normal step)."""
        clear_grads(params)
        base_step()


def make_backend(sync: str, buffers: Callable[[], list[Tensor]] | None = None) -> Backend:
    """The plain-PyTorch backend, all-reducing over torch.distributed when ``sync='global'`` and W > 1."""
    return Backend(default_reducer(sync), buffers, world=default_reducer("global"))
