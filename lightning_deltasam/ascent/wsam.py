"""WSAM (Yue et al. 2023, weighted sharpness): the loss plus gamma/(1-gamma) times the sharpness g_p - g."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..distributed import local_tensors
from ..options import VariantOptions, check_bool, check_number
from .base import SAM, register


@dataclass(frozen=True)
class WSAMOptions(VariantOptions, name="wsam"):
    """WSAM's options (pytorch_optimizer's names and defaults).

    Args:
        gamma: the sharpness weight, in [0, 1), used as a = gamma / (1 - gamma).
        decouple: True: the base step runs on g, then w <- w - lr a (g_p - g) outside it; False: it runs on
            g + a (g_p - g).
    """

    gamma: float = 0.9
    decouple: bool = True

    def check(self) -> None:
        check_number("gamma", self.gamma, minimum=0.0, below=1.0, hint=" It is used as gamma/(1-gamma).")
        check_bool("decouple", self.decouple)


@register(WSAMOptions)
class WSAM(SAM):
    keeps_gradient = True
    options: WSAMOptions

    @torch.no_grad()
    def descent_(self, params: list[Tensor]) -> None:
        both, g, gp = self.gradient_pair(params)
        if not both:
            return
        a = self.options.gamma / (1.0 - self.options.gamma)
        if self.options.decouple:
            self.pending["sharpness"] = dict(zip(both, torch._foreach_sub(gp, g)))
            torch._foreach_copy_(gp, g)
        else:
            torch._foreach_lerp_(gp, g, 1.0 - a)  # g_p + (1 - a)(g - g_p) = g + a (g_p - g)

    def pending_tensors(self) -> list[Tensor]:
        return list(self.pending.get("sharpness", {}).values())

    @torch.no_grad()
    def after_step(self, param_groups: list[dict[str, Any]]) -> None:
        sharpness = self.pending.get("sharpness", {})
        a = self.options.gamma / (1.0 - self.options.gamma)
        for group in param_groups:
            mine = [p for p in group["params"] if p in sharpness]
            if mine:
                torch._foreach_add_(local_tensors(mine), [sharpness[p] for p in mine], alpha=-float(group["lr"]) * a)
        super().after_step(param_groups)
