"""delta-SAM's weights from per-instance scores (``ProbeWeights``): the losses themselves, or Gaussian forward
probes of every parameter (drawn before the first pass, which replays their dropout masks) or of the head only
(after it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from torch import Tensor

from ..delta_weights import DeltaWeights, ProbeLosses, Weights, compute_weights, instance_scores
from ..options import check_bool, check_choice, check_int, check_number
from ..passes import Passes
from ..probing import HeadProbe, RNGReplay, full_probes, head_probes
from ..profiler import phase
from ..restore import Snapshot
from .base import Weighting, register

ProbeScale = Literal["relative", "absolute"]
ProbeScope = Literal["auto", "all", "head"]


@dataclass(frozen=True)
class ProbeWeights(DeltaWeights, name="probes"):
    """delta-SAM with scores from K Gaussian forward probes (the paper's way), or from the losses (``score="loss"``).

    Args:
        num_probes: K, the probes per step (forward only).
        probe_std: sigma of the probes.
        probe_scale: ``"relative"`` (dw = sigma z (|w| + eta), SAMConfig's ``eta``) or ``"absolute"`` (sigma z).
        antithetic: also probe at w - dw (pairs).
        probe_scope: ``"all"`` parameters, the module's ``"head"`` split, or ``"auto"`` (head when it splits).
    """

    num_probes: int = 8
    probe_std: float = 0.01
    probe_scale: ProbeScale = "relative"
    antithetic: bool = False
    probe_scope: ProbeScope = "auto"

    def check(self) -> None:
        super().check()
        check_int("num_probes", self.num_probes, minimum=1)
        check_number("probe_std", self.probe_std, minimum=0.0, strict=True)
        check_choice("probe_scale", self.probe_scale, get_args(ProbeScale))
        check_bool("antithetic", self.antithetic)
        check_choice("probe_scope", self.probe_scope, get_args(ProbeScope))

    @property
    def uses_probes(self) -> bool:
        return self.score != "loss"

    def step_probe_scope(self) -> str:
        return self.probe_scope if self.uses_probes else "all"


@register(ProbeWeights)
class Probes(Weighting):
    options: ProbeWeights

    def prepare(
        self, params: list[Tensor], snapshot: Snapshot, passes: Passes, head: HeadProbe | None
    ) -> ProbeLosses | None:
        opts = self.options
        if opts.step_probe_scope() == "head" and head is None:
            raise ValueError(
                "probe_scope='head' needs a head probe: the module must define the split methods (see probes)."
            )
        if not opts.uses_probes or head is not None:
            return None
        if passes.forward is None:
            raise ValueError(f"score={opts.score!r} needs per-instance losses: define per_sample_loss.")
        rng = RNGReplay({p.device for p in params})
        with snapshot.restoring(), phase("probes"):
            probes = full_probes(
                opts.num_probes,
                opts.antithetic,
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
        opts, reducer = self.options, passes.backend.reducer
        losses = passes.losses(f"reweight={opts.name!r}")
        if head is not None and opts.uses_probes:
            prepared = head_probes(opts.num_probes, opts.antithetic, head, self.noise)
        weights = compute_weights(instance_scores(opts, losses, prepared, opts.probe_std, reducer), opts, reducer)
        passes.backend.backward((weights.delta.to(losses.dtype) * losses).sum())
        return losses, weights
