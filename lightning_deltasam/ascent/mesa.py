"""MESA (Du et al. 2022, "Sharpness-Aware Training for Free"): no perturbation; the step's one pass at w descends
on the mean loss plus ``weight * tau^2 * KL(softmax(f(x; w_ema) / tau) || softmax(f(x; w) / tau))``, the outputs
of an exponential moving average of w (in eval mode) taken as the teacher. About one forward more than the base
optimizer's step, and one copy of the weights more in memory (the EMA, checkpointed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import local_tensors
from ..options import VariantOptions, check_int, check_number
from .base import SAM, register


@dataclass(frozen=True)
class MESAOptions(VariantOptions, name="mesa"):
    """MESA. The forward returns the pair (per-instance losses [B], outputs [B, C]) (the mixin's
    ``per_sample_loss``, DeltaSAM's closure), and DeltaSAM needs ``module=`` (the teacher's forward runs the model in
    eval mode). SAMConfig's ``rho`` is not read. The EMA starts at w at the first step and follows every step.

    Args:
        weight: the KL term's coefficient (the authors' ``reinforce``, 0.3).
        temperature: the softmax temperature tau; the term is scaled by tau^2 (the authors' 5).
        decay: the EMA's decay per optimizer step: w_ema <- decay w_ema + (1 - decay) w (the authors' 0.9998).
        start_step: the first optimizer step (0-based) whose loss has the KL term (the authors count epochs,
            ``kl_start_epoch``); the EMA is updated from step 0.
    """

    needs_first_pass = False
    needs_outputs = True
    weight: float = 0.3
    temperature: float = 5.0
    decay: float = 0.9998
    start_step: int = 0

    def check(self) -> None:
        check_number("weight", self.weight, minimum=0.0, hint=" It scales the KL term; 0 is the base optimizer.")
        check_number("temperature", self.temperature, minimum=0.0, strict=True)
        check_number("decay", self.decay, minimum=0.0, below=1.0, hint=" The EMA's decay per step, e.g. 0.9998.")
        check_int("start_step", self.start_step, minimum=0)

    def sharding_refusal(self, flat: bool) -> tuple[str, str] | None:
        return ("variant='mesa': its EMA teacher is not tested under sharded parameters", "Use DDP for MESA")


@register(MESAOptions)
class MESA(SAM):
    """The EMA is per-parameter state (checkpointed by name); it is updated after each base step."""

    options: MESAOptions

    def perturbs(self, step: int) -> bool:
        return False

    def teacher_weights(self, params: list[Tensor]) -> list[Tensor] | None:
        """The EMA of each of ``params`` (started at w where there is none yet); None before ``start_step``."""
        for p in params:
            if "ema" not in self.state.setdefault(p, {}):
                self.state[p]["ema"] = local_tensors([p])[0].detach().clone()
        if self.step < self.options.start_step:
            return None
        return [self.state[p]["ema"] for p in params]

    def outputs_term(self, outputs: Tensor, teacher_outputs: Tensor | None) -> Tensor:
        """weight * tau^2 * the mean over instances of KL(teacher || student) over the last dimension (classes);
        zero before ``start_step``."""
        if outputs.dim() < 2 or outputs.shape[-1] < 2:
            raise ValueError(
                f"variant='mesa' compares class distributions, but the outputs have shape {tuple(outputs.shape)} "
                "(one value per instance: a regression?), where the KL term is zero. Return the logits [B, C], "
                "or use another variant."
            )
        if teacher_outputs is None:
            return outputs.new_zeros(())
        tau = self.options.temperature
        kl = F.kl_div(F.log_softmax(outputs / tau, -1), F.softmax(teacher_outputs / tau, -1), reduction="none")
        return kl.sum(-1).mean() * (self.options.weight * tau**2)

    @torch.no_grad()
    def after_step(self, param_groups: list[dict[str, Any]]) -> None:
        super().after_step(param_groups)
        params = [p for g in param_groups for p in g["params"] if p.requires_grad and "ema" in self.state.get(p, {})]
        if params:
            emas = [self.state[p]["ema"] for p in params]
            torch._foreach_lerp_(emas, local_tensors(params), 1.0 - self.options.decay)
