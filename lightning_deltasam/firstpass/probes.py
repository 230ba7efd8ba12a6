"""delta-SAM's weights from per-instance scores (``estimator="probes"``): the losses themselves, or Gaussian
forward probes of every parameter (drawn before the first pass, which replays their dropout masks) or of the
head only (after it)."""

from __future__ import annotations

from torch import Tensor

from ..parts import Passes, Snapshot, phase
from ..probes import HeadProbe, RNGReplay, full_probes, head_probes
from ..weighting import ProbeLosses, Weights, compute_weights, instance_scores
from .base import Weighting, register


@register("probes")
class Probes(Weighting):
    def prepare(
        self, params: list[Tensor], snapshot: Snapshot, passes: Passes, head: HeadProbe | None
    ) -> ProbeLosses | None:
        cfg = self.config
        if cfg.step_probe_scope == "head" and head is None:
            raise ValueError(
                "probe_scope='head' needs a head probe: the module must define the split methods (see probes)."
            )
        if not cfg.uses_probes or head is not None:
            return None
        if passes.forward is None:
            raise ValueError(f"score={cfg.score!r} needs per-instance losses: define per_sample_loss.")
        rng = RNGReplay({p.device for p in params})
        with snapshot.restoring(), phase("probes"):
            probes = full_probes(
                cfg,
                params,
                self.noise,
                passes.forward,
                rng,
                lambda: snapshot.restore(buffers=False),
                passes.backend.forward_context,
            )
        rng.rewind()
        return probes

    def weigh(self, passes: Passes, head: HeadProbe | None, prepared: ProbeLosses | None) -> tuple[Tensor, Weights]:
        cfg, reducer = self.config, passes.backend.reducer
        losses = passes.losses("reweight='delta'")
        if head is not None and cfg.uses_probes:
            prepared = head_probes(cfg, head, self.noise)
        weights = compute_weights(instance_scores(cfg, losses, prepared, cfg.probe_std, reducer), cfg, reducer)
        passes.backend.backward((weights.delta.to(losses.dtype) * losses).sum())
        return losses, weights
