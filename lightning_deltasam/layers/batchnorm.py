"""Batch normalization in eval mode (``nn.BatchNorm1d/2d/3d`` with running statistics): per channel,
y = x_hat * gamma + beta with x_hat from the running statistics, so every instance has its own gradient,
sum over its positions of b * x_hat (gamma) and of b (beta): Full terms per channel. In training mode the
statistics are the batch's and each instance's loss depends on the others: the capture refuses that."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, Kind, cat_tokens, group_sum, per_instance, wide
from .terms import Full, Term


class BatchNormKind(Kind):
    label = "BatchNorm (eval mode)"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return type(module).forward is nn.BatchNorm1d.forward  # BatchNorm1d/2d/3d share it

    def check(self) -> None:
        mod = self.module
        assert isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d)
        if not mod.track_running_stats:
            raise self.refusal(
                "has track_running_stats=False: it always normalizes with the batch's statistics, so no instance has "
                "a gradient of its own"
            )

    def _xhat(self, x: Tensor) -> Tensor:
        """x normalized with the running statistics, [B, C, *]."""
        mod = self.module
        assert isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d)
        return F.batch_norm(x, mod.running_mean, mod.running_var, None, None, False, 0.0, mod.eps)

    @staticmethod
    def _by_channel(t: Tensor, bsz: int) -> Tensor:
        """[B, C, *] -> [B, positions, C]."""
        return t.reshape(bsz, t.shape[1], -1).transpose(1, 2)

    def terms(self, calls: list[Call], bsz: int, m: int, dense: bool) -> list[tuple[Tensor, Term]]:
        b = cat_tokens([self._by_channel(wide(c.grad), bsz) for c in calls], dim=1)
        out: list[tuple[Tensor, Term]] = []
        weight, bias = self.params.get("weight"), self.params.get("bias")
        if weight is not None:
            with torch.no_grad():
                xhat = cat_tokens([self._by_channel(wide(self._xhat(c.x)), bsz) for c in calls], dim=1)
            out.append((weight, group_sum(xhat * b, bsz, m)))
        if bias is not None:
            out.append((bias, group_sum(b, bsz, m)))
        return out

    def correct(self, x: Tensor, out: Tensor, eps: dict[int, list[Term]], bsz: int, m: int, cache: dict) -> Tensor:
        shape = (bsz, out.shape[1], *([1] * (out.dim() - 2)))  # a channel's value, broadcast over its positions
        y = out
        weight, bias = self.params.get("weight"), self.params.get("bias")
        if weight is not None and eps.get(id(weight)):
            xhat = self._xhat(x)
            for term in eps[id(weight)]:
                assert isinstance(term, Full)
                y = y + xhat * per_instance(term.value, bsz, m).reshape(shape).to(y.dtype)
        if bias is not None:
            for term in eps.get(id(bias), []):
                assert isinstance(term, Full)
                y = y + per_instance(term.value, bsz, m).reshape(shape).to(y.dtype)
        return y
