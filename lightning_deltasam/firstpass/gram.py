"""delta-SAM's weights from the per-instance gradient Gram matrix (``estimator="exact"``, or its rank-r sketch,
``"sketch"``): one forward, one backward to the layers' outputs, and g_delta = sum_i delta_i g_i formed from what
the layer hooks (:class:`~lightning_deltasam.gram.GramCapture`) kept."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..config import SAMConfig
from ..gram import GramCapture
from ..parts import LayerHooks, Passes, phase
from ..probes import HeadProbe, ProbeNoise
from ..weighting import Weights, compute_weights, gram_scores
from .base import Weighting, register


@register("exact", "sketch")
class Gram(Weighting):
    def __init__(self, config: SAMConfig, params: Callable[[], list[Tensor]], noise: ProbeNoise) -> None:
        super().__init__(config, params, noise)
        self._hooks = LayerHooks(self._build)

    def weigh(self, passes: Passes, head: HeadProbe | None, prepared: Any) -> tuple[Tensor, Weights]:
        cfg, reducer = self.config, passes.backend.reducer
        capture = self.capture(passes.module)
        try:
            losses = capture.first_pass(
                lambda: passes.losses(f"estimator={cfg.estimator!r}"), passes.batch_size, passes.backend.loss_scale()
            )
            with phase("gram"):
                scores = gram_scores(capture.gram(), cfg, reducer)  # float64; float32 unless the model is float64
                if any(p.dtype != torch.float64 for p in self.params()):
                    scores = scores.float()
                weights = compute_weights(scores, cfg, reducer)
                for p, g in capture.weighted_grads(weights.delta).items():
                    p.grad = g
        finally:
            capture.clear()
        return losses, weights

    def capture(self, module: nn.Module | None) -> GramCapture:
        """The hooks that form ``module``'s per-instance gradient Grams (built once per module and parameter set)."""
        return self._hooks.get(module, self.params(), f"estimator={self.config.estimator!r}")

    def _build(self, module: nn.Module, params: list[Tensor]) -> GramCapture:
        gen = self.noise.generator(params[0].device) if self.config.estimator == "sketch" else None
        return GramCapture(module, params, self.config.estimator, self.config.sketch_rank, gen, self.config.verify)  # type: ignore[arg-type]
