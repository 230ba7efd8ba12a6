"""What one step measured (:class:`StepStats`), for logging."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor


@dataclass
class StepStats:
    """What one step measured, for logging. ``loss`` is the mean loss at the unperturbed w (None when the
    step did not see it: the two-step API, whose first backward is the caller's)."""

    loss: Tensor | None
    losses: Tensor | None = None
    eps_norm: float = 0.0
    loss_rise: float = float("nan")
    weight_entropy: float = float("nan")
    weight_max: float = float("nan")
    weight_fallback: bool = False
    skipped: bool = False
    grad_norm_ratio: float = float(
        "nan"
    )  # m set: mean over instances of ||G_g||/|g| against ||g_bar|| (see instance_perturbation.py)

    def as_log_dict(self, skipped_total: int) -> dict[str, float]:
        out = {"deltasam/skipped_steps": float(skipped_total)}
        if not math.isnan(self.loss_rise):
            out["deltasam/eps_norm"] = self.eps_norm
            out["deltasam/loss_rise"] = self.loss_rise
        if not math.isnan(self.weight_entropy):
            out["deltasam/weight_entropy"] = self.weight_entropy
            out["deltasam/weight_max"] = self.weight_max
            out["deltasam/weight_fallback"] = float(self.weight_fallback)
        if not math.isnan(self.grad_norm_ratio):
            out["deltasam/grad_norm_ratio"] = self.grad_norm_ratio
        return out
