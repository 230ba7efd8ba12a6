"""Momentum-SAM (Becker et al. 2024): eps = -rho v / ||v||, v the base optimizer's momentum (SGD's
``momentum_buffer``, Adam's / AdamW's ``exp_avg``), so the step needs no first pass: one forward and backward at
w + eps, w restored, the base step on that gradient. About the base optimizer's cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..distributed import local_tensors, norm_of
from ..options import VariantOptions
from .base import SAM, Ascent, AscentGroup, register

MOMENTUM_KEYS = ("exp_avg", "momentum_buffer")  # Adam / AdamW (and their kin); SGD / RMSprop with momentum


@dataclass(frozen=True)
class MomentumSAMOptions(VariantOptions, name="msam"):
    """Momentum-SAM has no option of its own: SAMConfig's ``rho`` is the radius along the negative momentum (the
    authors' defaults: 0.3 with SGD, larger with AdamW). Needs a base optimizer with momentum; it perturbs before
    the step's only pass, so it takes per-instance losses (``step(closure)``), not the two-step API."""

    needs_first_pass = False


@register(MomentumSAMOptions)
class MomentumSAM(SAM):
    options: MomentumSAMOptions

    @torch.no_grad()
    def ascent_without_pass(self, param_groups: list[dict[str, Any]], params: list[Tensor]) -> Ascent:
        """eps = -rho_k v / ||v|| per group (the norm over every group and rank); zero before the base optimizer has
        a momentum (the first step), refused if it keeps none after its first step."""
        state = self.base_state()
        groups, norms = [], []
        for index, group in enumerate(param_groups):
            pairs = [(p, _momentum(state.get(p, {}))) for p in group["params"] if p.requires_grad]
            held = [(p, v) for p, v in pairs if v is not None]
            if held:
                rho = self.group_options(param_groups, index)[0]
                direction = list(torch._foreach_mul(local_tensors([v for _, v in held]), -1.0))
                tensor_norms = list(torch._foreach_norm(direction))
                groups.append(AscentGroup(local_tensors([p for p, _ in held]), direction, rho, tensor_norms))
                norms.extend(tensor_norms)
        if not groups and self.step > 0:
            raise ValueError(
                "variant='msam' perturbs along the base optimizer's momentum (Adam's exp_avg, SGD's "
                "momentum_buffer), and the base optimizer keeps none after its first step: use one with momentum "
                "(e.g. torch.optim.SGD(..., momentum=0.9) or AdamW), or another variant."
            )
        return Ascent(groups, norm_of(norms, self.shards))


def _momentum(state: dict[str, Any]) -> Tensor | None:
    """The momentum the base optimizer keeps for a parameter, or None."""
    for key in MOMENTUM_KEYS:
        if isinstance(state.get(key), Tensor):
            return state[key]
    return None
