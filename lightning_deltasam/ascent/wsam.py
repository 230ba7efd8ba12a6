"""WSAM (Yue et al. 2023, weighted sharpness): the loss plus gamma/(1-gamma) times the sharpness g_p - g."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..distributed import local_tensors
from .base import SAM, register


@register("wsam")
class WSAM(SAM):
    """``gamma`` (0.9): a = gamma / (1 - gamma). ``decouple=True``: the base step runs on g, then
    w <- w - lr a (g_p - g) outside the base optimizer; ``decouple=False``: it runs on g + a (g_p - g)."""

    keeps_gradient = True

    @torch.no_grad()
    def descent_(self, params: list[Tensor]) -> None:
        both, g, gp = self.gradient_pair(params)
        if not both:
            return
        a = self.config.gamma / (1.0 - self.config.gamma)
        if self.config.decouple:
            self.pending["sharpness"] = dict(zip(both, torch._foreach_sub(gp, g)))
            torch._foreach_copy_(gp, g)
        else:
            torch._foreach_lerp_(gp, g, 1.0 - a)  # g_p + (1 - a)(g - g_p) = g + a (g_p - g)

    def pending_tensors(self) -> list[Tensor]:
        return list(self.pending.get("sharpness", {}).values())

    @torch.no_grad()
    def after_step(self, param_groups: list[dict[str, Any]]) -> None:
        sharpness = self.pending.get("sharpness", {})
        a = self.config.gamma / (1.0 - self.config.gamma)
        for group in param_groups:
            mine = [p for p in group["params"] if p in sharpness]
            if mine:
                torch._foreach_add_(local_tensors(mine), [sharpness[p] for p in mine], alpha=-float(group["lr"]) * a)
        super().after_step(param_groups)
