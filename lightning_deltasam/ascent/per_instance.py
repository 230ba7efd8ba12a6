"""The per-instance route, option ``m``: each group of m instances ascends from its own w + eps_g = rho G_g/||G_g||
(m = 1 exact per-instance SAM, m = k m-sharpness), all in one batched second pass through the layer hooks of
:mod:`lightning_deltasam.instance_perturbation`. w never moves, so the core's restore covers the running statistics only."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..backend import Backend
from ..guard import Guard
from ..instance_perturbation import InstancePerturbation
from ..layer_hooks import LayerHooks
from ..options import check_adaptive_with_m
from ..passes import Passes
from ..profiler import phase
from ..restore import BufferPool, Snapshot, clear_grads
from ..stats import StepStats

RATIO_EVERY = 10  # steps between two grad_norm_ratio diagnostics (every step with match_rho, which needs it)


def norm_ratio(group_norms: Tensor, sizes: Tensor, batch_sq: Tensor) -> float:
    """mean_i ||G_g(i)||/|g(i)| / ||g_bar||: the factor by which the per-group first-order loss rise (rho ||G_g||
    per group) exceeds SAM's (rho ||g_bar|| on average), so rho_SAM / ratio is the radius that matches SAM's."""
    bar = float(batch_sq.sqrt()) / float(sizes.sum())
    per_instance = float(group_norms.double().cpu().sum()) / float(sizes.sum())  # sum_g |g| (||G_g||/|g|) / n
    return per_instance / bar if bar > 0 else float("nan")


def ascent_norms(
    route: InstancePerturbation, losses: Tensor, loss0: Tensor
) -> tuple[dict[Tensor, Tensor], Tensor, bool]:
    """{parameter: [G] ||G_g||^2 restricted to it}, their sum over parameters ([G] ||G_g||^2), and whether that and
    the mean loss ``loss0`` are finite."""
    squares = route.group_norms_sq()
    total = torch.stack(list(squares.values())).sum(0) if squares else losses.new_zeros(1)
    finite = bool(torch.isfinite(total.sum() + loss0.float()))
    return squares, total, finite


def perturb(
    route: InstancePerturbation, squares: dict[Tensor, Tensor], norm: Tensor, rho_of: dict[Tensor, float], factor: float
) -> float:
    """Each group's eps_g = rho factor G_g/||G_g|| installed in ``route`` (none where ||G_g|| = 0), from the squared
    norms ``squares`` and ``norm`` (||G_g||); the mean ||eps_g||."""
    inverse = torch.where(norm > 0, 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(norm))
    route.scale({p: rho_of[p] * factor * inverse for p in squares})
    eps_sq = sum((rho_of[p] * factor) ** 2 * sq for p, sq in squares.items()) * inverse.square()
    return float(torch.as_tensor(eps_sq).sqrt().mean())


class PerInstanceRoute:
    """The step of ``m`` (the core calls :meth:`step` in place of its own perturb-and-descend); ``match_rho`` scales
    the radius to SAM's units, ``verify`` checks the per-instance gradients (SAMConfig's options)."""

    def __init__(self, m: int | None, match_rho: bool = False, verify: str = "auto") -> None:
        self.m, self.match_rho = m, match_rho
        self._hooks = LayerHooks(lambda module, params: InstancePerturbation(module, params, m, verify))  # type: ignore[arg-type]

    def step(
        self,
        params: list[Tensor],
        passes: Passes,
        backend: Backend,
        base_step: Callable[[], Any],
        *,
        radii: dict[Tensor, float],
        guard: Guard,
        pool: BufferPool,
    ) -> StepStats:
        """``m`` set: each group of m instances descends from its own w + eps_g, all in one batched second pass.

        First pass: a forward with hooks and one backward to the layers' outputs (no parameter gradient);
        ||G_g|| from what they kept. Second pass: the per-group corrections installed, a backward of the mean
        loss. w is never moved, so nothing needs restoring and no perturbation is all-reduced. The core hands it what
        it needs: each parameter's radius (:meth:`radii`), the guard (finite check, skip, base step) and its buffers."""
        if self.match_rho and backend.reducer.world_size > 1:
            raise ValueError(
                f"match_rho=True under DDP with sync='global' ({backend.reducer.world_size} ranks): the matched radius "
                "needs the global batch gradient's norm, which the per-instance route does not form. Use a fixed rho "
                "(rho_SAM / the logged deltasam/grad_norm_ratio), or sync='local' (each rank matches its own batch)."
            )
        route = self.route(passes.module, params)
        rho_of = radii
        buffers = backend.buffers()
        snapshot = Snapshot([], [], buffers, pool.saved("buffers", buffers))
        try:
            with passes.backend.no_sync(), phase("first_pass"):
                losses = route.first_pass(lambda: passes.losses(f"m={self.m}"), passes.batch_size, backend.loss_scale())
            loss0 = losses.detach().mean()
            stats = StepStats(loss=loss0, losses=losses.detach())
            with torch.no_grad(), phase("ascent_norm"):
                squares, total, finite = ascent_norms(route, losses, loss0)
            if not guard.agree_finite(finite, backend):
                return guard.skip_step(params, stats, backend, base_step, "the first pass")
            norm = total.sqrt()
            ratio = float("nan")
            if self.match_rho or guard.steps % RATIO_EVERY == 0:  # a weight-gradient GEMM per layer: not every step
                with torch.no_grad(), phase("statistics"):
                    stats.grad_norm_ratio = ratio = norm_ratio(norm, route.group_sizes(), route.batch_grad_norm_sq())
            # match_rho: rho in SAM's units, the radius whose mean first-order loss rise equals SAM's at rho
            factor = (1.0 / ratio if math.isfinite(ratio) and ratio > 0 else 0.0) if self.match_rho else 1.0
            with torch.no_grad(), phase("perturb"):
                stats.eps_norm = perturb(route, squares, norm, rho_of, factor)
            snapshot.keep_buffers()  # the first pass's statistics are the ones kept
            clear_grads(params)
            with snapshot.restoring(), route.corrections(), phase("second_pass"):
                loss1, _ = passes.descent()
        finally:
            route.clear()
        with phase("statistics"):
            stats.loss_rise = float(loss1.float() - loss0.float())
        return guard.finish(params, stats, backend, base_step, loss1)

    def radii(self, param_groups: list[dict[str, Any]], group_options: Callable[..., Any]) -> dict[Tensor, float]:
        """Each trainable parameter's rho (its group's, from the rule's ``group_options``); an ASAM group is refused
        (its eps_i is not low-rank)."""
        rho_of: dict[Tensor, float] = {}
        for index, group in enumerate(param_groups):
            rho, adaptive, _ = group_options(param_groups, index)
            check_adaptive_with_m(f"param_groups[{index}]['adaptive']", adaptive, self.m)  # type: ignore[arg-type]
            rho_of.update((p, rho) for p in group["params"] if p.requires_grad)
        return rho_of

    def route(self, module: nn.Module | None, params: list[Tensor]) -> InstancePerturbation:
        """The hooks that give each group of ``m`` instances its own perturbation (built once per module and parameter set)."""
        return self._hooks.get(module, params, f"m={self.m}")
