"""The configuration of a SAM-family step: the options every rule shares, composed with the options of the chosen
ascent rule (``variant``) and first-pass weighting (``reweight``), each declared in its own file."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from .ascent.base import SAMOptions
from .options import (
    Neighbourhood,
    VariantOptions,
    Verify,
    WeightingOptions,
    check_adaptive_with_m,
    check_bool,
    check_choice,
    check_int,
    check_number,
)

Sync = Literal["global", "local"]


@dataclass(frozen=True)
class SAMConfig:
    """The options of the SAM / delta-SAM step, shared by every adapter (what each computes: docs/algorithm.md).

    Args:
        rho: radius of the perturbation; ``0`` makes the step the base optimizer's (one pass).
        adaptive: ASAM: eps = rho T^2 g / ||T g||, T = |w| + ``eta``.
        eta: the offset of ASAM's T = |w| + eta (and of relative probes).
        variant: the ascent rule and its options, e.g. ``GSAMOptions(alpha=0.4)``; default SAM / ASAM
            (:mod:`lightning_deltasam.ascent`, one file per rule).
        reweight: ``None`` is SAM; a weighting's options make the step delta-SAM: ``ProbeWeights(...)``
            (Gaussian forward probes) or ``GramWeights(...)`` (the Gram matrix of per-instance gradients)
            (:mod:`lightning_deltasam.firstpass`, one file per weighting).
        m: instances per perturbation: ``None`` the whole batch, ``1`` exact per-instance SAM, ``k`` m-sharpness,
            in one batched second pass (:mod:`lightning_deltasam.instance_perturbation`).
        match_rho: with ``m``, the radius each step is rho / (mean_i ||g_i|| / ||g_bar||): rho in SAM's units.
        verify: with ``m`` or ``GramWeights``, check the per-instance gradients against autograd: ``"auto"`` (the
            rows on each new shape signature, two instances' gradients on the first step), ``"always"``, ``"off"``.
        sync: under DDP, ``"global"`` (the step over the global batch) or ``"local"`` (each rank its own eps).
        seed: seed of the probe and sketch generator and of ESAM's draw (identical on every rank).
    """

    rho: float = 0.05
    adaptive: bool = False
    eta: float = 0.01
    variant: VariantOptions = field(default_factory=SAMOptions)
    reweight: WeightingOptions | None = None
    m: int | None = None
    match_rho: bool = False
    verify: Verify = "auto"
    sync: Sync = "global"
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("rho", self.rho, minimum=0.0, hint=" Use rho=0 for the plain base optimizer.")
        check_bool("adaptive", self.adaptive)
        check_number("eta", self.eta, minimum=0.0)
        if not isinstance(self.variant, VariantOptions):
            raise ValueError(
                f"variant={self.variant!r} must be a variant's options, e.g. variant=GSAMOptions() "
                "(from lightning_deltasam.ascent); SAMConfig.from_dict takes names."
            )
        if self.reweight is not None and not isinstance(self.reweight, WeightingOptions):
            raise ValueError(
                f"reweight={self.reweight!r} must be None (SAM) or a weighting's options, e.g. reweight=ProbeWeights() "
                "(from lightning_deltasam.firstpass); SAMConfig.from_dict takes names."
            )
        if self.m is not None:
            check_int(
                "m", self.m, minimum=1, hint=" It is the number of instances per perturbation; None is the batch."
            )
        check_bool("match_rho", self.match_rho)
        check_choice("verify", self.verify, get_args(Verify))
        check_choice("sync", self.sync, get_args(Sync))
        check_int("seed", self.seed)
        self._check_combinations()

    def _check_combinations(self) -> None:
        """The combinations that make no sense, each refused with the options that clash and the fix."""
        variant = self.variant
        if self.m is not None and self.reweight is not None:
            raise ValueError(
                f"m={self.m!r} with reweight={self.reweight.name!r}: m gives each group of m instances its own exact "
                "perturbation, while delta-SAM approximates that with one reweighted batch perturbation. Use one: "
                "reweight=None with m, or m=None with a reweight."
            )
        if self.m is not None:
            check_adaptive_with_m("adaptive", self.adaptive, self.m)
        if self.match_rho and self.m is None:
            raise ValueError(
                "match_rho=True scales the radius of the per-instance route (option m); with m=None the step is SAM's "
                "already. Set m (e.g. m=1) or match_rho=False."
            )
        if self.reweight is not None and not variant.combines_with_reweight:
            raise ValueError(
                f"variant={variant.name!r} with reweight={self.reweight.name!r}: the variant needs the plain gradient "
                "at w, which delta-SAM replaces by a reweighted one. Use reweight=None with it, or the variant 'sam'."
            )
        if self.m is not None and not variant.needs_first_pass:
            raise ValueError(
                f"variant={variant.name!r} with m={self.m!r}: the variant perturbs before the pass at w that m's "
                "per-instance perturbations come from. Use m=None with it, or the variant 'sam'."
            )
        if self.m is not None and not variant.combines_with_m:
            raise ValueError(
                f"variant={variant.name!r} with m={self.m!r}: the per-instance route forms no batch gradient at "
                "w + eps for the variant to combine. Use m=None with it, or the variant 'sam'."
            )

    def check_two_step(self) -> None:
        """The two-step API (and a closure that runs backward itself) gives no per-instance losses: refuse what needs them."""
        if self.m is not None:
            raise ValueError(
                f"m={self.m} needs per-instance losses and the model, which first_step()/second_step() and "
                "a closure that calls backward() itself do not give: use step(closure) with closure() returning "
                "the per-instance losses, shape [B], and pass the model (DeltaSAM(..., module=model)); or m=None."
            )
        if self.variant.selects_instances:
            raise ValueError(
                f"variant={self.variant.name!r} runs its second pass on chosen instances, which first_step()/"
                "second_step() and a closure that calls backward() itself do not give: use step(closure) with "
                "closure(instances=None) returning the per-instance losses of those rows."
            )
        if not self.variant.needs_first_pass:
            raise ValueError(
                f"variant={self.variant.name!r} perturbs before the step's only pass, which first_step()/second_step() "
                "and a closure that calls backward() itself run at w: use step(closure) with closure() returning the "
                "per-instance losses, shape [B] (the optimizer runs the backward)."
            )
        if self.reweighting:
            raise ValueError(
                f"reweight={self.reweight.name!r} needs per-instance losses, which first_step()/second_step() and a "  # type: ignore[union-attr]
                "closure that calls backward() itself do not give: use step(closure) with closure() returning the "
                "per-instance losses, shape [B] (or reweight=None for SAM / ASAM)."
            )

    @property
    def perturbing(self) -> bool:
        """Whether the configured radius perturbs at all (rho > 0; a parameter group may still set its own)."""
        return self.rho > 0

    @property
    def reweighting(self) -> bool:
        """Whether the step is delta-SAM's: a weighting and a radius."""
        return self.perturbing and self.reweight is not None

    @property
    def per_instance(self) -> bool:
        """Whether each group of ``m`` instances gets its own perturbation (the per-instance route)."""
        return self.perturbing and self.m is not None

    @property
    def weighting(self) -> WeightingOptions | None:
        """The first pass's weighting options this step uses (None: SAM's uniform weights)."""
        return self.reweight if self.reweighting else None

    @property
    def hooks_layers(self) -> bool:
        """Whether the step hooks the model's layers (``m``, or a weighting from per-instance gradients)."""
        return self.per_instance or (self.weighting is not None and self.weighting.hooks_layers)

    @property
    def step_probe_scope(self) -> str:
        """Where this step's probes run: the weighting's ``probe_scope``, or ``"all"`` when it draws no probe."""
        return self.weighting.step_probe_scope() if self.weighting is not None else "all"

    @property
    def neighbourhood(self) -> Neighbourhood:
        return Neighbourhood(self.rho, self.adaptive, self.eta)

    def sharding_refusal(self, flat: bool = False) -> tuple[str, str] | None:
        """(what cannot be right, what works instead) when the step needs what sharded parameters do not give;
        None when it can run sharded. ``flat``: FSDP1's flat parameters (use_orig_params=False)."""
        if self.per_instance:
            return (
                f"m={self.m}: the per-instance route hooks each layer on its whole weight",
                "Use m=None (SAM, or delta-SAM with ProbeWeights), or DDP for m",
            )
        if self.weighting is not None and self.weighting.hooks_layers:
            return (
                f"reweight={self.weighting.name!r}: the Gram rule forms per-instance gradients from whole layer weights",
                "Use ProbeWeights (delta-SAM's probe rule), or DDP for the Gram rule",
            )
        if self.sync == "local":
            return (
                "sync='local': FSDP reduces every gradient over ranks inside the backward, so no rank holds its own "
                "gradient to perturb along",
                "Use sync='global'",
            )
        if self.step_probe_scope == "head":
            return ("probe_scope='head': the head is probed functionally, on whole weights", "Use probe_scope='all'")
        return self.variant.sharding_refusal(flat)

    def describe(self) -> str:
        """One line saying what runs, e.g. ``gsam(alpha=0.3) rho=0.05`` or ``sam rho=0.01 m=1``."""
        parts = [self.variant.describe().removesuffix("()"), f"rho={self.rho:g}"]
        if self.adaptive:
            parts.append(f"adaptive eta={self.eta:g}")
        if self.m is not None:
            parts.append(f"m={self.m}" + (" match_rho" if self.match_rho else ""))
        if self.reweight is not None:
            parts.append(f"reweight={self.reweight.describe().removesuffix('()')}")
        return " ".join(parts)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> SAMConfig:
        """The config of a plain dict (the app's yaml): ``variant`` and ``reweight`` as a name or a dict with a
        ``name`` and the rule's options. Unknown keys are refused with the allowed ones."""
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a SAM option; the options: {', '.join(cls.option_names())}.")
        options = dict(options)
        for key, base in (("variant", VariantOptions), ("reweight", WeightingOptions)):
            value = _plain(options.get(key))
            if value is None:
                continue
            try:
                options[key] = base.from_value(value)
            except ValueError as err:  # a rule's own check names its bare option: say where it lives
                text = str(err)
                raise ValueError(text if text.startswith(f"{key}=") else f"{key}.{text}") from None
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["variant"] = self.variant.to_dict()
        out["reweight"] = self.reweight.to_dict() if self.reweight is not None else None
        return out


def _plain(value: Any) -> Any:
    """A mapping (an OmegaConf node included) as a dict; anything else as it is."""
    return dict(value.items()) if hasattr(value, "items") else value
