"""Restoring w bit for bit: the :class:`Snapshot` of w and the running statistics, the buffers it lives in
(:class:`BufferPool`), and the copies every way out of a step relies on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .profiler import phase


@torch.no_grad()
def copy_all_(dst: list[Tensor], src: list[Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all i: one fused kernel, or, where a tensor type lacks it (a tensor subclass,
    e.g. a DTensor, raises there), one copy per tensor. Every copy that can be made is made before an error
    propagates, so the restore guarantee does not rest on the fused kernel."""
    if not dst:
        return
    try:
        torch._foreach_copy_(dst, src)
        return
    except Exception:  # noqa: BLE001 - any failure of the fused kernel falls back to per-tensor copies
        pass
    error: Exception | None = None
    for d, s in zip(dst, src):
        try:
            d.copy_(s)
        except Exception as err:  # noqa: BLE001 - copy the rest, then raise the first failure
            error = error or err
    if error is not None:
        raise error


def clear_grads(params: list[Tensor]) -> None:
    """``p.grad = None`` for each of ``params`` (frees the memory; the next backward allocates afresh)."""
    for p in params:
        p.grad = None


class Snapshot:
    """w and the running statistics as the step found them; :meth:`restore` puts them back bit for bit."""

    def __init__(
        self, params: list[Tensor], saved: list[Tensor], buffers: list[Tensor], saved_buffers: list[Tensor]
    ) -> None:
        self.params, self.saved, self.buffers, self.saved_buffers = params, saved, buffers, saved_buffers

    @torch.no_grad()
    def restore(self, buffers: bool = True) -> None:
        with phase("restore"):
            copy_all_(self.params, self.saved)
            if buffers:
                copy_all_(self.buffers, self.saved_buffers)

    @torch.no_grad()
    def keep_buffers(self) -> None:
        """The running statistics as they are now (after the first pass) become the ones restored."""
        copy_all_(self.saved_buffers, self.buffers)

    @contextmanager
    def restoring_on_error(self) -> Iterator[None]:
        """An exception inside restores w and the statistics before it propagates."""
        try:
            yield
        except BaseException:
            self.restore()
            raise

    @contextmanager
    def restoring(self) -> Iterator[None]:
        """Whatever happens inside (a return, a NaN, an exception), w and the statistics are restored on the way out."""
        try:
            yield
        finally:
            self.restore()


class BufferPool:
    """Copies of tensors in buffers kept across steps, by key (no allocation once shapes settle)."""

    def __init__(self) -> None:
        self._stores: dict[str, list[Tensor]] = {}

    def saved(self, key: str, tensors: list[Tensor]) -> list[Tensor]:
        """A copy of ``tensors`` in the pool's buffers for ``key``, reallocated only when shapes or dtypes change."""
        store = self._stores.get(key)
        if (
            store is None
            or len(store) != len(tensors)
            or any(s.shape != t.shape or s.dtype != t.dtype or s.device != t.device for s, t in zip(store, tensors))
        ):
            store = [t.detach().clone() for t in tensors]
            self._stores[key] = store
        else:
            copy_all_(store, [t.detach() for t in tensors])
        return store

    @torch.no_grad()
    def snapshot(self, params: list[Tensor], buffers: list[Tensor]) -> Snapshot:
        """w and the running statistics as they are now, in the pool's buffers."""
        with phase("backup"):
            return Snapshot(params, self.saved("params", params), buffers, self.saved("buffers", buffers))
