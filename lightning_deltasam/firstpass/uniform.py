"""SAM's first pass: every instance weighs 1/B, so eps follows the batch's mean gradient."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..delta_weights import Weights, uniform_weights
from ..passes import Passes
from ..probing import HeadProbe
from .base import Weighting, register


@register(None)
class Uniform(Weighting):
    def weigh(self, passes: Passes, head: HeadProbe | None, prepared: Any) -> tuple[Tensor, Weights]:
        losses = passes.losses("the step")
        weights = uniform_weights(losses.numel(), losses.device, passes.backend.reducer)
        passes.backend.backward((weights.delta.to(losses.dtype) * losses).sum())
        return losses, weights
