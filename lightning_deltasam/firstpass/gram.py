"""delta-SAM's weights from the per-instance gradient Gram matrix (``GramWeights``), exact or its rank-r sketch:
one forward, one backward to the layers' outputs, and g_delta = sum_i delta_i g_i formed from what the layer hooks
(:class:`~lightning_deltasam.gram_capture.GramCapture`) kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..delta_weights import DeltaWeights, Weights, compute_weights, gram_scores
from ..gram_capture import GramCapture
from ..layer_hooks import LayerHooks
from ..options import check_int
from ..passes import Passes
from ..probing import HeadProbe
from ..profiler import phase
from .base import Weighting, register

GRAM_SCORES = ("gram", "gradnorm")  # the scores a per-instance Gram matrix gives


@dataclass(frozen=True)
class GramWeights(DeltaWeights, name="gram"):
    """delta-SAM with scores from the Gram matrix K of per-instance gradients, formed in the first backward by hooks
    on the model's layers (the model must be given). The exact rule is ``GramWeights(score="gram", weights="linear")``.

    Args:
        sketch_rank: None: K exact; r: K from rank-r sketches of each layer's per-instance gradients (cheaper).
    """

    hooks_layers = True
    sketch_rank: int | None = None

    def check(self) -> None:
        super().check()
        if self.score not in GRAM_SCORES:
            raise ValueError(
                f"reweight='gram' gives per-instance gradients, which score={self.score!r} does not use; use "
                "score='gram' (or 'gradnorm') with it, or ProbeWeights."
            )
        if self.sketch_rank is not None:
            check_int("sketch_rank", self.sketch_rank, minimum=1, hint=" None forms the Gram matrix exactly.")

    @property
    def mode(self) -> str:
        return "exact" if self.sketch_rank is None else "sketch"


@register(GramWeights)
class Gram(Weighting):
    options: GramWeights

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hooks = LayerHooks(self._build)

    def weigh(self, passes: Passes, head: HeadProbe | None, prepared: Any) -> tuple[Tensor, Weights]:
        opts, reducer = self.options, passes.backend.reducer
        capture = self.capture(passes.module)
        try:
            losses = capture.first_pass(
                lambda: passes.losses("reweight='gram'"), passes.batch_size, passes.backend.loss_scale()
            )
            with phase("gram"):
                scores = gram_scores(capture.gram(), opts, reducer)  # float64; float32 unless the model is float64
                if any(p.dtype != torch.float64 for p in self.params()):
                    scores = scores.float()
                weights = compute_weights(scores, opts, reducer)
                for p, g in capture.weighted_grads(weights.delta).items():
                    p.grad = g
        finally:
            capture.clear()
        return losses, weights

    def capture(self, module: nn.Module | None) -> GramCapture:
        """The hooks that form ``module``'s per-instance gradient Grams (built once per module and parameter set)."""
        return self._hooks.get(module, self.params(), "reweight='gram'")

    def _build(self, module: nn.Module, params: list[Tensor]) -> GramCapture:
        opts = self.options
        gen = self.noise.generator(params[0].device) if opts.sketch_rank is not None else None
        return GramCapture(module, params, opts.mode, opts.sketch_rank or 32, gen, self.verify)  # type: ignore[arg-type]
