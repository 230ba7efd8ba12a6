"""GSAM (Zhuang et al. 2022, surrogate gap): descend on g_p - alpha (g - proj_{g_p} g), rho following the LR."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import SAM, global_sums, register, total_norm

EPS = 1e-12  # pytorch_optimizer's perturb_eps


@register("gsam")
class GSAM(SAM):
    """``alpha`` (default 0.4) weighs the component of g orthogonal to g_p. With ``min_rho`` set, a group's
    rho_t = min_rho + (rho - min_rho) lr_t / lr_max (lr_max its ``initial_lr`` or first lr), as pytorch_optimizer's
    ``ProportionScheduler`` with min_lr = 0; ``min_rho=None`` keeps rho fixed."""

    keeps_gradient = True

    def radius(self, group: dict[str, Any], rho: float) -> float:
        low = self.config.min_rho
        if low is None:
            return rho
        peak = float(group.setdefault("initial_lr", group["lr"]))
        return low + (rho - low) * float(group["lr"]) / peak if peak > 0 else rho

    @torch.no_grad()
    def descent_(self, params: list[Tensor]) -> None:
        both, g, gp = self.gradient_pair(params)
        if self.shards.sharded:  # the three sums over every rank's shard: one all-reduce, which every rank joins
            inner, new2, old2 = global_sums([list(zip(g, gp)), list(zip(gp, gp)), list(zip(g, g))], self.shards)
            new, old = new2.sqrt(), old2.sqrt()
        elif both:
            inner = torch.stack([(a * b).sum() for a, b in zip(g, gp)]).sum()
            new, old = total_norm(gp), total_norm(g)
        if not both:
            return
        cosine = inner / (new * old + EPS)
        vertical = torch._foreach_mul(gp, -(cosine * old / (new + EPS)))  # g - proj_{g_p} g
        torch._foreach_add_(vertical, g)
        alpha = 0.4 if self.config.alpha is None else self.config.alpha
        torch._foreach_add_(gp, vertical, alpha=-alpha)
