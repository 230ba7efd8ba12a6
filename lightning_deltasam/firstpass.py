"""The first-pass weighting: how the gradient at w that eps follows is weighted over the batch's instances.

Uniform (SAM), probes (delta-SAM's scores from Gaussian forward probes, :mod:`.probes`), or the exact / sketched
per-instance gradient Gram matrix (:mod:`.gram`); the weights from the scores are :mod:`.weighting`'s. This part
owns the probe generators (:class:`~.probes.ProbeNoise`, checkpointed by the core) and the Gram hooks."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .config import SAMConfig
from .gram import GramCapture
from .parts import LayerHooks, Passes, Snapshot, StepStats, phase
from .probes import HeadProbe, ProbeNoise, RNGReplay, full_probes, head_probes
from .weighting import (
    ProbeLosses,
    Weights,
    compute_weights,
    gram_scores,
    instance_scores,
    uniform_weights,
    weight_stats,
)


class FirstPass:
    """The weighted first pass at w of ``config`` over the parameters ``params()`` returns."""

    def __init__(self, config: SAMConfig, params: Callable[[], list[Tensor]]) -> None:
        self.config = config
        self.params = params
        self.noise = ProbeNoise(config)
        self._gram = LayerHooks(self._build_gram)

    def probes(self, params: list[Tensor], snapshot: Snapshot, passes: Passes) -> ProbeLosses:
        """Probes of every parameter, before the first pass, which then replays the probes' dropout masks."""
        if passes.forward is None:
            raise ValueError(f"score={self.config.score!r} needs per-instance losses: define per_sample_loss.")
        rng = RNGReplay({p.device for p in params})
        with snapshot.restoring(), phase("probes"):
            probes = full_probes(
                self.config,
                params,
                self.noise,
                passes.forward,
                rng,
                lambda: snapshot.restore(buffers=False),
                passes.backend.forward_context,
            )
        rng.rewind()
        return probes

    def run(self, passes: Passes, probes: ProbeLosses | None, head: HeadProbe | None) -> StepStats:
        """Backward of sum_i delta_i l_i at w (delta uniform for SAM), its gradient unreduced: the direction of eps."""
        cfg = self.config
        reducer = passes.backend.reducer
        with passes.backend.no_sync():
            if passes.first_pass is not None and not cfg.reweighting:
                return StepStats(loss=passes.first_pass().detach())
            weights: Weights
            if cfg.uses_gram:
                losses, weights = self.gram_pass(passes)
            else:
                losses = passes.losses("reweight='delta'" if cfg.reweighting else "the step")
                if cfg.reweighting:
                    if head is not None and cfg.uses_probes:
                        probes = head_probes(cfg, head, self.noise)
                    weights = compute_weights(
                        instance_scores(cfg, losses, probes, cfg.probe_std, reducer), cfg, reducer
                    )
                else:
                    weights = uniform_weights(losses.numel(), losses.device, reducer)
                passes.backend.backward((weights.delta.to(losses.dtype) * losses).sum())
        stats = StepStats(loss=losses.detach().mean(), losses=losses.detach())
        if cfg.reweighting:
            with phase("statistics"):
                stats.weight_entropy, stats.weight_max = weight_stats(weights.delta, reducer)
            stats.weight_fallback = weights.fallback
        return stats

    def gram_pass(self, passes: Passes) -> tuple[Tensor, Weights]:
        """estimator 'exact' / 'sketch': one forward, one backward to the layers' outputs, weights from the
        per-instance gradient Gram matrix, and g_delta = sum_i delta_i g_i book-kept into ``.grad``."""
        cfg, reducer = self.config, passes.backend.reducer
        capture = self.gram_capture(passes.module)
        try:
            with capture.record(passes.batch_size):
                losses = passes.losses(f"estimator={cfg.estimator!r}")
            with phase("gram"):
                capture.backward(losses, scale=passes.backend.loss_scale())
                weights = compute_weights(gram_scores(capture.gram(), cfg, reducer), cfg, reducer)
                for p, g in capture.weighted_grads(weights.delta).items():
                    p.grad = g
        finally:
            capture.clear()
        return losses, weights

    def gram_capture(self, module: nn.Module | None) -> GramCapture:
        """The hooks that form ``module``'s per-instance gradient Grams (built once per module and parameter set)."""
        return self._gram.get(module, self.params(), f"estimator={self.config.estimator!r}")

    def _build_gram(self, module: nn.Module, params: list[Tensor]) -> GramCapture:
        gen = self.noise.generator(params[0].device) if self.config.estimator == "sketch" else None
        return GramCapture(module, params, self.config.estimator, self.config.sketch_rank, gen)  # type: ignore[arg-type]
