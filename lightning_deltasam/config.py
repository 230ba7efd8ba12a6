"""The options of a SAM / delta-SAM step, validated once and shared by every adapter."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

Reweight = Literal["delta"] | None
Score = Literal["sharpness", "gradnorm", "loss", "gram"]
Weighting = Literal["softmax", "linear"]
ProbeScale = Literal["relative", "absolute"]
ProbeScope = Literal["auto", "all", "head"]
Sync = Literal["global", "local"]
Estimator = Literal["probes", "exact", "sketch"]
Verify = Literal["auto", "always", "off"]
ClipAlgorithm = Literal["norm", "value"]
Variant = Literal["sam", "gsam", "wsam", "looksam", "friendly"]

REWEIGHTS = (None, "delta")
SCORES: tuple[str, ...] = get_args(Score)
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
PROBE_SCALES: tuple[str, ...] = get_args(ProbeScale)
PROBE_SCOPES: tuple[str, ...] = get_args(ProbeScope)
SYNCS: tuple[str, ...] = get_args(Sync)
CLIP_ALGORITHMS: tuple[str, ...] = get_args(ClipAlgorithm)
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
VERIFY: tuple[str, ...] = get_args(Verify)
VARIANTS: tuple[str, ...] = get_args(Variant)  # each is a file in lightning_deltasam/ascent/
EXACT_SCORES = ("gram", "gradnorm")  # the scores an exact / sketched per-instance Gram matrix gives


# ----------------------------------------------------------------------------- validators
# The one set of option checks (library and app): each error names the option, its value and what is allowed.
def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name}={value!r} is not supported; use one of {shown}.")


def check_number(
    name: str, value: Any, *, minimum: float, strict: bool = False, below: float = math.inf, hint: str = ""
) -> None:
    """A finite real number >= ``minimum`` (> when ``strict``) and < ``below``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number.{hint}")
    if value < minimum or (strict and value == minimum) or value >= below:
        op = ">" if strict else ">="
        upper = f" and < {below}" if below != math.inf else ""
        raise ValueError(f"{name}={value!r} must be {op} {minimum}{upper}.{hint}")


def check_int(name: str, value: Any, *, minimum: int | None = None, hint: str = "") -> None:
    """An integer (not a bool), >= ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name}={value!r} must be an integer{bound}.{hint}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False.")


@dataclass(frozen=True)
class SAMConfig:
    """Every option of the SAM / delta-SAM step (what each computes: docs/algorithm.md).

    ``rho=0`` makes the step the base optimizer's (one pass: with a zero perturbation the
    second pass would recompute the first). ``reweight=None`` is SAM; ``"delta"`` is delta-SAM.
    ``estimator`` says where per-instance gradient information comes from: ``"probes"`` (Gaussian
    forward probes), ``"exact"`` (the Gram matrix of per-instance gradients from the first
    backward, :mod:`~lightning_deltasam.gram`) or ``"sketch"`` (its rank-``sketch_rank`` sketch).
    The exact rule is ``score="gram", weights="linear", estimator="exact"``. ``m`` (None: the whole
    batch) is the number of consecutive instances that share one perturbation: ``m=1`` is exact
    per-instance SAM, ``m=k`` m-sharpness, both in one batched second pass (:mod:`~lightning_deltasam.instance`);
    with ``match_rho`` its radius each step is rho / (mean_i ||g_i|| / ||g_bar||): rho in SAM's units, the mean
    first-order loss rise SAM's at rho. ``verify`` (``m`` and the Gram estimators) checks the per-instance
    gradients against autograd: ``"auto"`` the rows on each new shape signature and two instances' gradients on the
    first step, ``"always"`` both every step, ``"off"`` neither (:mod:`~lightning_deltasam.layers`).
    ``variant`` picks the ascent rule (:mod:`~lightning_deltasam.ascent`) with its own options (``alpha``,
    ``min_rho``, ``gamma``, ``decouple``, ``k``, ``sigma``, ``lmbda``, named and defaulted as in pytorch_optimizer);
    ``interval=k`` perturbs only every k-th step (composer's SAM), a plain base step otherwise.
    """

    rho: float = 0.05
    adaptive: bool = False
    eta: float = 0.01
    reweight: Reweight = None
    score: Score = "gradnorm"
    weights: Weighting = "softmax"
    temperature: float = 4.0
    mix: float = 0.0
    num_probes: int = 8
    probe_std: float = 0.01
    probe_scale: ProbeScale = "relative"
    antithetic: bool = False
    probe_scope: ProbeScope = "auto"
    gram_ridge: float = 1e-3
    estimator: Estimator = "probes"
    sketch_rank: int = 32
    sync: Sync = "global"
    seed: int = 0
    m: int | None = None
    match_rho: bool = False
    verify: Verify = "auto"
    variant: Variant = "sam"
    interval: int = 1
    alpha: float | None = None
    min_rho: float | None = None
    gamma: float = 0.9
    decouple: bool = True
    k: int = 10
    sigma: float = 1.0
    lmbda: float = 0.9

    def __post_init__(self) -> None:
        check_number("rho", self.rho, minimum=0.0, hint=" Use rho=0 for the plain base optimizer.")
        check_bool("adaptive", self.adaptive)
        check_number("eta", self.eta, minimum=0.0)
        check_choice("reweight", self.reweight, REWEIGHTS)
        check_choice("score", self.score, SCORES)
        check_choice("weights", self.weights, WEIGHTINGS)
        check_number("temperature", self.temperature, minimum=0.0, strict=True)
        check_number("mix", self.mix, minimum=0.0)
        if self.mix > 1:
            raise ValueError(f"mix={self.mix!r} must lie in [0, 1] (the share of uniform weights).")
        check_int("num_probes", self.num_probes, minimum=1)
        check_number("probe_std", self.probe_std, minimum=0.0, strict=True)
        check_choice("probe_scale", self.probe_scale, PROBE_SCALES)
        check_choice("probe_scope", self.probe_scope, PROBE_SCOPES)
        check_bool("antithetic", self.antithetic)
        check_number("gram_ridge", self.gram_ridge, minimum=0.0)
        check_choice("estimator", self.estimator, ESTIMATORS)
        if self.estimator != "probes" and self.score not in EXACT_SCORES:
            raise ValueError(
                f"estimator={self.estimator!r} gives per-instance gradients, which score={self.score!r} does not use; "
                f"use score='gram' (or 'gradnorm') with it, or estimator='probes'."
            )
        check_int("sketch_rank", self.sketch_rank, minimum=1, hint=" It is the rank r of estimator='sketch'.")
        check_choice("sync", self.sync, SYNCS)
        check_int("seed", self.seed)
        if self.m is not None:
            check_int(
                "m", self.m, minimum=1, hint=" It is the number of instances per perturbation; None is the whole batch."
            )
            if self.reweight is not None:
                raise ValueError(
                    f"m={self.m!r} with reweight={self.reweight!r}: m gives each group of m instances its own exact "
                    "perturbation, while reweight='delta' approximates that with one reweighted batch perturbation. "
                    "Use one: reweight=None with m, or m=None with reweight='delta'."
                )
            if self.adaptive:
                raise ValueError(
                    f"m={self.m!r} with adaptive=True: ASAM's per-instance eps_i = rho T^2 g_i/||T g_i|| is not low-rank, "
                    "so the per-instance route cannot apply it. Use adaptive=False with m, or m=None for ASAM."
                )

        check_bool("match_rho", self.match_rho)
        check_choice("verify", self.verify, VERIFY)
        if self.match_rho and self.m is None:
            raise ValueError(
                "match_rho=True scales the radius of the per-instance route (option m); with m=None the step is SAM's "
                "already. Set m (e.g. m=1) or match_rho=False."
            )
        self._check_variant()

    def _check_variant(self) -> None:
        """The variant options, and the combinations a variant refuses (each error names the option and the fix)."""
        check_choice("variant", self.variant, VARIANTS)
        check_int("interval", self.interval, minimum=1, hint=" It perturbs every interval-th step; 1 is every step.")
        if self.alpha is not None:
            check_number("alpha", self.alpha, minimum=0.0, hint=" It is GSAM's (default 0.4) or LookSAM's (0.7) alpha.")
            if self.alpha > 1:
                raise ValueError(
                    f"alpha={self.alpha!r} must lie in [0, 1] (GSAM's and LookSAM's alpha); None is the variant's default."
                )
            if self.variant not in ("gsam", "looksam"):
                raise ValueError(
                    f"alpha={self.alpha!r} is an option of variant='gsam' or 'looksam', not variant={self.variant!r}; "
                    "set alpha=None or pick one of those variants."
                )
        if self.min_rho is not None:
            check_number("min_rho", self.min_rho, minimum=0.0)
            if self.variant != "gsam":
                raise ValueError(
                    f"min_rho={self.min_rho!r} is GSAM's rho schedule, not an option of variant={self.variant!r}; "
                    "use variant='gsam' or min_rho=None."
                )
        check_number(
            "gamma", self.gamma, minimum=0.0, below=1.0, hint=" It is WSAM's sharpness weight, used as gamma/(1-gamma)."
        )
        check_bool("decouple", self.decouple)
        check_int("k", self.k, minimum=1, hint=" It is LookSAM's period: SAM every k-th step.")
        check_number("sigma", self.sigma, minimum=0.0)
        check_number("lmbda", self.lmbda, minimum=0.0)
        if self.variant == "sam":
            return
        if self.reweight is not None:
            raise ValueError(
                f"variant={self.variant!r} with reweight={self.reweight!r}: the variants need the plain gradient at w, "
                "which delta-SAM replaces by a reweighted one. Use reweight=None with a variant, or variant='sam'."
            )
        if self.m is not None:
            raise ValueError(
                f"variant={self.variant!r} with m={self.m!r}: the per-instance route forms no batch gradient at "
                "w + eps for the variant to combine. Use m=None with a variant, or variant='sam'."
            )
        if self.interval != 1:
            raise ValueError(
                f"variant={self.variant!r} with interval={self.interval!r}: interval is composer's every-k-steps SAM "
                "(LookSAM has its own k). Use interval=1 with a variant, or variant='sam'."
            )

    def check_two_step(self) -> None:
        """The two-step API (and a closure that runs backward itself) gives no per-instance losses: refuse what needs them."""
        if self.m is not None:
            raise ValueError(
                f"m={self.m} needs per-instance losses and the model, which first_step()/second_step() and "
                "a closure that calls backward() itself do not give: use step(closure) with closure() returning "
                "the per-instance losses, shape [B], and pass the model (DeltaSAM(..., module=model)); or m=None."
            )
        if self.reweighting:
            raise ValueError(
                "reweight='delta' needs per-instance losses, which first_step()/second_step() and a closure that "
                "calls backward() itself do not give: use step(closure) with closure() returning the "
                "per-instance losses, shape [B] (or reweight=None for SAM / ASAM)."
            )

    @property
    def enabled(self) -> bool:
        """Whether the step perturbs at all (rho > 0)."""
        return self.rho > 0

    @property
    def reweighting(self) -> bool:
        return self.enabled and self.reweight == "delta"

    @property
    def per_instance(self) -> bool:
        """Whether each group of ``m`` instances gets its own perturbation (the per-instance route)."""
        return self.enabled and self.m is not None

    @property
    def uses_probes(self) -> bool:
        return self.reweighting and self.score != "loss" and self.estimator == "probes"

    @property
    def uses_gram(self) -> bool:
        """Whether the first pass forms the per-instance gradient Gram matrix (estimator 'exact' or 'sketch')."""
        return self.reweighting and self.estimator != "probes"

    @property
    def step_probe_scope(self) -> str:
        """Where this step's probes run: ``probe_scope``, or ``"all"`` when the step draws no probe."""
        return self.probe_scope if self.uses_probes else "all"

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def split(cls, kwargs: dict[str, Any]) -> tuple[SAMConfig, dict[str, Any]]:
        """Separate SAM options from the rest (e.g. base-optimizer kwargs)."""
        names = set(cls.option_names())
        mine = {k: v for k, v in kwargs.items() if k in names}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        return cls(**mine), rest

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
