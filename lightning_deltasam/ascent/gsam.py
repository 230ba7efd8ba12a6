"""GSAM (Zhuang et al. 2022, surrogate gap): descend on g_p - alpha (g - proj_{g_p} g), rho following the LR."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..distributed import global_sums, total_norm
from ..options import VariantOptions, check_number
from .base import EPS, SAM, register


@dataclass(frozen=True)
class GSAMOptions(VariantOptions, name="gsam"):
    """GSAM's options (pytorch_optimizer's names and defaults).

    Args:
        alpha: weight of the component of g orthogonal to g_p, in [0, 1].
        min_rho: rho follows the LR from ``rho`` (at the initial LR) down to ``min_rho`` (at LR 0); None: fixed rho.
    """

    alpha: float = 0.4
    min_rho: float | None = None

    def check(self) -> None:
        check_number("alpha", self.alpha, minimum=0.0)
        if self.alpha > 1:
            raise ValueError(f"alpha={self.alpha!r} must lie in [0, 1] (GSAM's weight of the orthogonal part).")
        if self.min_rho is not None:
            check_number("min_rho", self.min_rho, minimum=0.0, hint=" None keeps rho fixed.")


@register(GSAMOptions)
class GSAM(SAM):
    """With ``min_rho`` set, a group's rho_t = min_rho + (rho - min_rho) lr_t / lr_max (lr_max its ``initial_lr``
    or first lr), as pytorch_optimizer's ``ProportionScheduler`` with min_lr = 0."""

    keeps_gradient = True
    options: GSAMOptions

    def radius(self, group: dict[str, Any], rho: float) -> float:
        low = self.options.min_rho
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
        torch._foreach_add_(gp, vertical, alpha=-self.options.alpha)
