"""The first-pass weighting the core calls: which weights delta_i the gradient at w that eps follows puts on the
batch's instances. :class:`FirstPass` runs the shared part (the adapter's own pass, DDP's no_sync, the weight
statistics); a :class:`Weighting` subclass in one file states how its weights are formed, registered with the
options class that selects it (``SAMConfig(reweight=...)``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..delta_weights import Weights, weight_stats
from ..options import WeightingOptions
from ..passes import Passes
from ..probing import HeadProbe, ProbeNoise
from ..profiler import phase
from ..restore import Snapshot
from ..stats import StepStats

WEIGHTINGS: dict[type[WeightingOptions] | None, type[Weighting]] = {}


def register(options: type[WeightingOptions] | None) -> Callable[[type[Weighting]], type[Weighting]]:
    """Class decorator: the weighting that ``options`` selects (None: SAM's uniform weights)."""

    def add(cls: type[Weighting]) -> type[Weighting]:
        WEIGHTINGS[options] = cls
        return cls

    return add


class Weighting:
    """How the first pass weights the instances: ``options`` its own (None for SAM's), ``params()`` the trainable
    parameters, ``noise`` the probe generators (owned and checkpointed by :class:`FirstPass`), ``verify`` the
    per-instance gradient check of the weightings that hook the layers."""

    def __init__(
        self, options: Any, params: Callable[[], list[Tensor]], noise: ProbeNoise, verify: str = "auto"
    ) -> None:
        self.options, self.params, self.noise, self.verify = options, params, noise, verify

    def prepare(self, params: list[Tensor], snapshot: Snapshot, passes: Passes, head: HeadProbe | None) -> Any:
        """Before the first pass, with w restorable from ``snapshot`` (e.g. probes); its value goes to :meth:`weigh`."""
        return None

    def weigh(self, passes: Passes, head: HeadProbe | None, prepared: Any) -> tuple[Tensor, Weights]:
        """The forward at w: (per-instance losses, weights), leaving sum_i delta_i grad l_i (unreduced) in ``.grad``."""
        raise NotImplementedError


class FirstPass:
    """The weighted first pass at w: ``options`` (None: SAM's uniform weights) selects the registered weighting;
    ``seed`` seeds the probe and sketch generators, ``eta`` is the relative probes' offset."""

    def __init__(
        self,
        options: WeightingOptions | None,
        params: Callable[[], list[Tensor]],
        *,
        seed: int = 0,
        eta: float = 0.01,
        verify: str = "auto",
    ) -> None:
        self.options = options
        self.noise = ProbeNoise(seed, *_probe_scale(options, eta))
        self.weighting = WEIGHTINGS[type(options) if options is not None else None](options, params, self.noise, verify)

    def run(self, passes: Passes, params: list[Tensor], snapshot: Snapshot, head: HeadProbe | None) -> StepStats:
        """Backward of sum_i delta_i l_i at w (an adapter's own mean-loss pass for SAM): the direction of eps."""
        reweighting = self.options is not None
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


def _probe_scale(options: WeightingOptions | None, eta: float) -> tuple[float, float | None]:
    """(sigma, the relative offset or None) of the weighting's probes; the defaults where it draws none."""
    std = getattr(options, "probe_std", 0.01)
    return std, (eta if getattr(options, "probe_scale", "relative") == "relative" else None)
