"""FriendlySAM (Li et al. 2024): perturb along g - sigma m, m the EMA of past gradients (removes the full-batch
component from the ascent); m <- lmbda m + (1 - lmbda) g."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..options import VariantOptions, check_number
from .base import SAM, register


@dataclass(frozen=True)
class FriendlySAMOptions(VariantOptions, name="friendly"):
    """FriendlySAM's options (pytorch_optimizer's names and defaults).

    Args:
        sigma: how much of the gradients' EMA m is subtracted from the ascent direction.
        lmbda: the EMA's decay: m <- lmbda m + (1 - lmbda) g.
    """

    sigma: float = 1.0
    lmbda: float = 0.9

    def check(self) -> None:
        check_number("sigma", self.sigma, minimum=0.0)
        check_number("lmbda", self.lmbda, minimum=0.0)


@register(FriendlySAMOptions)
class FriendlySAM(SAM):
    """The first step perturbs along g (SAM) and sets m = g. m is per-parameter state of the wrapper
    (checkpointed), apart from the base optimizer's."""

    options: FriendlySAMOptions

    @torch.no_grad()
    def gradient_at_w(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        cfg = self.options
        have = [i for i, p in enumerate(params) if p in self.state]
        momentum = {p: g.clone() for p, g in zip(params, grads) if p not in self.state}
        direction = list(grads)
        if have:
            old = [self.state[params[i]]["m"] for i in have]
            g = [grads[i] for i in have]
            shifted = torch._foreach_add(g, old, alpha=-cfg.sigma)
            for i, d in zip(have, shifted):
                direction[i] = d
            new = torch._foreach_lerp(old, g, 1.0 - cfg.lmbda)
            momentum.update((params[i], m) for i, m in zip(have, new))
        self.pending["m"] = momentum
        return direction

    def after_step(self, param_groups: list[dict[str, Any]]) -> None:
        for p, m in self.pending.get("m", {}).items():
            self.state[p] = {"m": m}
        super().after_step(param_groups)
