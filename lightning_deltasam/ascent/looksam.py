"""LookSAM (Liu et al. 2022): SAM every k-th step, storing g_v (the part of g_p orthogonal to g) per tensor;
on the other steps one pass at w and descend on g + alpha ||g|| / (||g_v|| + 1e-8) g_v."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..distributed import per_tensor_sums
from ..options import VariantOptions, check_int, check_number
from .base import EPS, SAM, grads_of, register


@dataclass(frozen=True)
class LookSAMOptions(VariantOptions, name="looksam"):
    """LookSAM's options (pytorch_optimizer's names and defaults).

    Args:
        k: the period: SAM on steps 0, k, 2k, ...; the reused g_v in between.
        alpha: weight of the reused g_v, in [0, 1].
    """

    k: int = 10
    alpha: float = 0.7

    def check(self) -> None:
        check_int("k", self.k, minimum=1, hint=" It is LookSAM's period: SAM every k-th step.")
        check_number("alpha", self.alpha, minimum=0.0)
        if self.alpha > 1:
            raise ValueError(f"alpha={self.alpha!r} must lie in [0, 1] (LookSAM's weight of the reused g_v).")

    def sharding_refusal(self, flat: bool) -> tuple[str, str] | None:
        if not flat:
            return None
        return (
            "variant='looksam': LookSAM normalizes each parameter tensor, and FSDP1 with use_orig_params=False "
            "gives the optimizer flat parameters (many tensors in one)",
            "Use FullyShardedDataParallel(..., use_orig_params=True), or FSDP2",
        )


@register(LookSAMOptions)
class LookSAM(SAM):
    """Norms per tensor, as pytorch_optimizer's LookSAM; g_v is per-parameter state (checkpointed)."""

    keeps_gradient = True
    options: LookSAMOptions

    def perturbs(self, step: int) -> bool:
        return step % self.options.k == 0

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
        torch._foreach_add_(grads, torch._foreach_mul(gv, scales), alpha=self.options.alpha)

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
        alpha = self.options.alpha
        for p, grad in zip(with_grad, grads):
            g2, gv2 = sums[id(p)]
            grad.add_(gvs[p] * (g2.sqrt() / (gv2.sqrt() + 1e-8)).to(grad.dtype), alpha=alpha)

    def after_step(self, param_groups: list[dict[str, Any]]) -> None:
        for p, gv in self.pending.get("gv", {}).items():
            self.state[p] = {"gv": gv}
        super().after_step(param_groups)
