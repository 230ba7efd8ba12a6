"""The first-pass weighting the core calls: which weights delta_i the gradient at w that eps follows puts on the
batch's instances. :class:`FirstPass` runs the shared part (the adapter's own pass, DDP's no_sync, the weight
statistics); a :class:`Weighting` subclass in one file states how its weights are formed, registered by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..config import SAMConfig
from ..parts import Passes, Snapshot, StepStats, phase
from ..probes import HeadProbe, ProbeNoise
from ..weighting import Weights, weight_stats

WEIGHTINGS: dict[str, type[Weighting]] = {}


def register(*names: str) -> Callable[[type[Weighting]], type[Weighting]]:
    """Class decorator: the weighting of ``estimator=name`` (``"uniform"``: SAM's, without ``reweight``)."""

    def add(cls: type[Weighting]) -> type[Weighting]:
        WEIGHTINGS.update(dict.fromkeys(names, cls))
        return cls

    return add


def weighting_name(config: SAMConfig) -> str:
    """The registry key of ``config``'s weighting: its ``estimator`` under ``reweight='delta'``, else ``"uniform"``."""
    return config.estimator if config.reweighting else "uniform"


class Weighting:
    """How the first pass weights the instances. ``params()`` gives the trainable parameters; ``noise`` the probe
    generators (owned and checkpointed by :class:`FirstPass`)."""

    def __init__(self, config: SAMConfig, params: Callable[[], list[Tensor]], noise: ProbeNoise) -> None:
        self.config, self.params, self.noise = config, params, noise

    def prepare(self, params: list[Tensor], snapshot: Snapshot, passes: Passes, head: HeadProbe | None) -> Any:
        """Before the first pass, with w restorable from ``snapshot`` (e.g. probes); its value goes to :meth:`weigh`."""
        return None

    def weigh(self, passes: Passes, head: HeadProbe | None, prepared: Any) -> tuple[Tensor, Weights]:
        """The forward at w: (per-instance losses, weights), leaving sum_i delta_i grad l_i (unreduced) in ``.grad``."""
        raise NotImplementedError


class FirstPass:
    """The weighted first pass at w of ``config`` (the registered weighting of :func:`weighting_name`)."""

    def __init__(self, config: SAMConfig, params: Callable[[], list[Tensor]]) -> None:
        self.config = config
        self.noise = ProbeNoise(config)
        self.weighting = WEIGHTINGS[weighting_name(config)](config, params, self.noise)

    def run(self, passes: Passes, params: list[Tensor], snapshot: Snapshot, head: HeadProbe | None) -> StepStats:
        """Backward of sum_i delta_i l_i at w (an adapter's own mean-loss pass for SAM): the direction of eps."""
        reweighting = self.config.reweighting
        if passes.first_pass is not None and not reweighting:
            with passes.backend.no_sync(), phase("first_pass"):
                return StepStats(loss=passes.first_pass().detach())
        prepared = self.weighting.prepare(params, snapshot, passes, head)
        with passes.backend.no_sync(), phase("first_pass"):
            losses, weights = self.weighting.weigh(passes, head, prepared)
        stats = StepStats(loss=losses.detach().mean(), losses=losses.detach())
        if reweighting:
            with phase("statistics"):
                stats.weight_entropy, stats.weight_max = weight_stats(weights.delta, passes.backend.reducer)
            stats.weight_fallback = weights.fallback
        return stats
