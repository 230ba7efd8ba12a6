"""LookSAM (Liu et al. 2022): SAM every k-th step, storing g_v (the part of g_p orthogonal to g) per tensor;
on the other steps one pass at w and descend on g + alpha ||g|| / (||g_v|| + 1e-8) g_v."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import SAM, grads_of, per_tensor_sums, register

EPS = 1e-12  # pytorch_optimizer's perturb_eps


@register("looksam")
class LookSAM(SAM):
    """``k`` (10): steps 0, k, 2k, ... perturb; ``alpha`` (default 0.7) weighs the reused g_v. Norms per tensor,
    as pytorch_optimizer's LookSAM; g_v is per-parameter state (checkpointed)."""

    keeps_gradient = True

    def perturbs(self, step: int) -> bool:
        return step % self.config.k == 0

    @torch.no_grad()
    def descent_(self, params: list[Tensor]) -> None:
        both, g, gp = self.gradient_pair(params)
        if self.shards.sharded:
            return self._sharded_descent(params, both, g, gp)
        if not both:
            return
        units = torch._foreach_div(g, [n.clamp_min(EPS) for n in torch._foreach_norm(g)])
        norms = torch._foreach_norm(gp)
        units_p = torch._foreach_div(gp, [n.clamp_min(EPS) for n in norms])
        cosines = [(a * b).sum() for a, b in zip(units, units_p)]
        projections = torch._foreach_mul(units, torch._foreach_mul(norms, cosines))
        self.pending["gv"] = dict(zip(both, torch._foreach_sub(gp, projections)))

    @torch.no_grad()
    def plain_descent_(self, params: list[Tensor]) -> None:
        with_grad, grads = grads_of([p for p in params if p in self.state])
        if self.shards.sharded:
            return self._sharded_plain_descent(params, with_grad, grads)
        if not with_grad:
            return
        gv = [self.state[p]["gv"] for p in with_grad]
        scales = torch._foreach_div(torch._foreach_norm(grads), torch._foreach_add(torch._foreach_norm(gv), 1e-8))
        alpha = 0.7 if self.config.alpha is None else self.config.alpha
        torch._foreach_add_(grads, torch._foreach_mul(gv, scales), alpha=alpha)

    def _sharded_descent(self, params: list[Tensor], both: list[Tensor], g: list[Tensor], gp: list[Tensor]) -> None:
        """:meth:`descent_` with each tensor's norms and inner product over every rank's shard."""
        sums = per_tensor_sums(params, {p: [(a, a), (b, b), (a, b)] for p, a, b in zip(both, g, gp)}, 3, self.shards)
        gv = {}
        for p, a, b in zip(both, g, gp):
            g2, gp2, dot = sums[id(p)]
            cosine = dot / (g2.sqrt().clamp_min(EPS) * gp2.sqrt().clamp_min(EPS))
            gv[p] = b - a * (gp2.sqrt() * cosine / g2.sqrt().clamp_min(EPS)).to(a.dtype)
        self.pending["gv"] = gv

    def _sharded_plain_descent(self, params: list[Tensor], with_grad: list[Tensor], grads: list[Tensor]) -> None:
        """:meth:`plain_descent_` with each tensor's norms over every rank's shard."""
        gvs = {p: self.state[p]["gv"] for p in with_grad}
        sums = per_tensor_sums(
            params, {p: [(g, g), (gvs[p], gvs[p])] for p, g in zip(with_grad, grads)}, 2, self.shards
        )
        alpha = 0.7 if self.config.alpha is None else self.config.alpha
        for p, grad in zip(with_grad, grads):
            g2, gv2 = sums[id(p)]
            grad.add_(gvs[p] * (g2.sqrt() / (gv2.sqrt() + 1e-8)).to(grad.dtype), alpha=alpha)

    def after_step(self, param_groups: list[dict[str, Any]]) -> None:
        for p, gv in self.pending.get("gv", {}).items():
            self.state[p] = {"gv": gv}
        super().after_step(param_groups)
