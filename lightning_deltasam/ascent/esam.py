"""ESAM (Du et al. 2022, "Efficient Sharpness-aware Minimization"): stochastic weight perturbation (eps only on a
random subset of the parameter tensors, each kept with probability beta, scaled by 1/beta) and sharpness-sensitive
data selection (the second pass's forward and backward on the gamma share of the batch whose loss rose most from w
to w + eps, found by one forward without grad)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..options import VariantOptions, check_number
from ..passes import Passes, check_per_sample_losses
from .base import SAM, Ascent, register

AUTHORS_EPS = 1e-7  # utils/Esam.py's scale = rho / (||g|| + 1e-7) / beta


@dataclass(frozen=True)
class ESAMOptions(VariantOptions, name="esam"):
    """ESAM on SAMConfig's ``rho`` (and ``adaptive``: the authors' ASAM form). The second pass runs on a subset of
    the batch: DeltaSAM's closure takes the instances, ``closure(instances=None)`` returning the losses of those
    rows (all rows when None); the mixin indexes the batch (``DeltaSAMMixin.select_instances``). The callback
    cannot, and refuses it.

    Args:
        beta: the probability that a parameter tensor is perturbed at a step (drawn per tensor and step from
            SAMConfig's ``seed``, the same on every rank); eps is scaled by 1/beta (the authors' 0.6 or 0.5).
        gamma: the share of the batch the second pass runs on: the floor(gamma B) instances (at least one) with
            the largest loss rise l_i(w + eps) - l_i(w); 1 is the whole batch (the authors' 0.5).
    """

    needs_first_pass = True
    selects_instances = True
    beta: float = 0.6
    gamma: float = 0.5

    def check(self) -> None:
        hint = " It is a probability in (0, 1]."
        for name, value in (("beta", self.beta), ("gamma", self.gamma)):
            check_number(name, value, minimum=0.0, strict=True, hint=hint)
            if value > 1:
                raise ValueError(f"{name}={value!r} must be <= 1.{hint}")

    def sharding_refusal(self, flat: bool) -> tuple[str, str] | None:
        return ("variant='esam': its per-tensor draw is not tested under sharded parameters", "Use DDP for ESAM")


@register(ESAMOptions)
class ESAM(SAM):
    """SAM's eps on the drawn tensors (norm over them), times 1/beta; the descent pass on the selected instances."""

    options: ESAMOptions
    seed: int = 0  # SAMConfig's seed, set by the engine

    def radius(self, group: dict[str, Any], rho: float) -> float:
        return rho / self.options.beta

    def ascent_of(self, param_groups: list[dict[str, Any]], params: list[Tensor], grads: list[Tensor]) -> Ascent:
        """SAM's eps over the tensors drawn this step (each with probability beta); the others stay at w."""
        if self.options.beta < 1.0:
            param_groups, params, grads = self._drawn(param_groups, params, grads)
        ascent = super().ascent_of(param_groups, params, grads)
        ascent.norm += AUTHORS_EPS
        return ascent

    def _drawn(
        self, param_groups: list[dict[str, Any]], params: list[Tensor], grads: list[Tensor]
    ) -> tuple[list[dict[str, Any]], list[Tensor], list[Tensor]]:
        """The groups, parameters and gradients of the tensors drawn this step."""
        generator = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + self.step)
        drawn = torch.rand(len(params), generator=generator, dtype=torch.float64) < self.options.beta
        kept = {id(p) for p, keep in zip(params, drawn.tolist()) if keep}
        groups = [{**g, "params": [p for p in g["params"] if id(p) in kept]} for g in param_groups]
        pairs = [(p, g) for p, g in zip(params, grads) if id(p) in kept]
        return groups, [p for p, _ in pairs], [g for _, g in pairs]

    def second_pass(self, passes: Passes, losses_at_w: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The losses at w + eps without grad, then the forward and backward of the mean loss of the
        floor(gamma B) instances whose loss rose most (in batch order)."""
        if self.options.gamma >= 1.0:
            return passes.descent()
        if losses_at_w is None or passes.select is None:
            raise ValueError(
                "variant='esam' runs its second pass on the instances whose loss rose most, which needs the "
                "per-instance losses and a forward on chosen rows: use DeltaSAM with closure(instances=None), or "
                "DeltaSAMMixin (not the callback); or gamma=1."
            )
        with torch.no_grad():
            rise = passes.losses("variant='esam'") - losses_at_w
        k = max(1, int(rise.numel() * self.options.gamma))
        chosen = torch.topk(rise, k).indices.sort().values
        with passes.backend.forward_context():
            losses = check_per_sample_losses(passes.select(chosen), f"{passes.source} on {k} instances", k)
        passes.backend.backward(losses.mean())
        return losses.detach().mean(), None
