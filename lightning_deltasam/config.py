"""The options of a SAM / delta-SAM step, validated once and shared by every adapter."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

REWEIGHTS = (None, "delta")
SCORES = ("sharpness", "gradnorm", "loss", "gram")
WEIGHTINGS = ("softmax", "linear")
PROBE_SCALES = ("relative", "absolute")
PROBE_SCOPES = ("auto", "all", "head")
SYNCS = ("global", "local")
CLIP_ALGORITHMS = ("norm", "value")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name}={value!r} is not supported; use one of {shown}.")


def _number(name: str, value: Any, *, minimum: float, strict: bool, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number.{hint}")
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name}={value!r} must be {op} {minimum}.{hint}")


@dataclass(frozen=True)
class SAMConfig:
    """Every option of the SAM / delta-SAM step (DELTASAM.md sections 1, 3 and 5).

    ``rho=0`` makes the step the base optimizer's (one pass: with a zero perturbation the
    second pass would recompute the first). ``reweight=None`` is SAM; ``"delta"`` is delta-SAM.
    """

    rho: float = 0.05
    adaptive: bool = False
    eta: float = 0.01
    reweight: Optional[str] = None
    score: str = "gradnorm"
    weights: str = "softmax"
    temperature: float = 4.0
    mix: float = 0.0
    num_probes: int = 8
    probe_std: float = 0.01
    probe_scale: str = "relative"
    antithetic: bool = False
    probe_scope: str = "auto"
    gram_ridge: float = 1e-3
    sync: str = "global"
    seed: int = 0

    def __post_init__(self) -> None:
        _number("rho", self.rho, minimum=0.0, strict=False, hint=" Use rho=0 for the plain base optimizer.")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"adaptive={self.adaptive!r} must be True or False.")
        _number("eta", self.eta, minimum=0.0, strict=False)
        _choice("reweight", self.reweight, REWEIGHTS)
        _choice("score", self.score, SCORES)
        _choice("weights", self.weights, WEIGHTINGS)
        _number("temperature", self.temperature, minimum=0.0, strict=True)
        _number("mix", self.mix, minimum=0.0, strict=False)
        if self.mix > 1:
            raise ValueError(f"mix={self.mix!r} must lie in [0, 1] (the share of uniform weights).")
        if isinstance(self.num_probes, bool) or not isinstance(self.num_probes, int) or self.num_probes < 1:
            raise ValueError(f"num_probes={self.num_probes!r} must be an integer >= 1.")
        _number("probe_std", self.probe_std, minimum=0.0, strict=True)
        _choice("probe_scale", self.probe_scale, PROBE_SCALES)
        _choice("probe_scope", self.probe_scope, PROBE_SCOPES)
        if not isinstance(self.antithetic, bool):
            raise ValueError(f"antithetic={self.antithetic!r} must be True or False.")
        _number("gram_ridge", self.gram_ridge, minimum=0.0, strict=False)
        _choice("sync", self.sync, SYNCS)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer.")

    @property
    def enabled(self) -> bool:
        """Whether the step perturbs at all (rho > 0)."""
        return self.rho > 0

    @property
    def reweighting(self) -> bool:
        return self.enabled and self.reweight == "delta"

    @property
    def uses_probes(self) -> bool:
        return self.reweighting and self.score != "loss"

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def split(cls, kwargs: dict[str, Any]) -> tuple["SAMConfig", dict[str, Any]]:
        """Separate SAM options from the rest (e.g. base-optimizer kwargs)."""
        names = set(cls.option_names())
        mine = {k: v for k, v in kwargs.items() if k in names}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        return cls(**mine), rest

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
