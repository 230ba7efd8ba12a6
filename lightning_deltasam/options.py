"""What every rule's options share: the checks an option runs where it is declared, and the two base classes a rule's
options derive from. Each rule (an ascent variant, a first-pass weighting) declares its options as a frozen dataclass
in its own file; :class:`~lightning_deltasam.config.SAMConfig` composes them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal, TypeVar

Verify = Literal["auto", "always", "off"]  # SAMConfig.verify: the per-instance gradient checks (layers/checks.py)


# ----------------------------------------------------------------------------- validators
# Each error names the option, its value and what is allowed.
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


def check_adaptive_with_m(option: str, adaptive: Any, m: int) -> None:
    """ASAM with the per-instance route is refused (for the config's ``adaptive`` and a group's own)."""
    if adaptive:
        raise ValueError(
            f"{option}=True with m={m}: ASAM's per-instance eps_i = rho T^2 g_i/||T g_i|| is not low-rank, "
            "so the per-instance route cannot apply it. Use adaptive=False with m, or m=None for ASAM."
        )


# ----------------------------------------------------------------------------- rule options
OptionsT = TypeVar("OptionsT", bound="RuleOptions")


@dataclass(frozen=True)
class RuleOptions:
    """A rule's options: a frozen dataclass, checked by :meth:`check` when built. ``name`` is the rule's registry
    name (``variant.name=...`` in the app's configs)."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "variant" or "reweight": the SAMConfig field that holds it
    registry: ClassVar[dict[str, type[RuleOptions]]]

    def __init_subclass__(cls, name: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name:
            cls.name = name
            cls.registry[name] = cls

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Validate the options (each error names the option, its value and the fix)."""

    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))

    def describe(self) -> str:
        """``name(option=value, ...)`` with the options that differ from their defaults."""
        default = type(self)()
        changed = [f"{k}={v!r}" for k, v in asdict(self).items() if getattr(default, k) != v]
        return f"{self.name}({', '.join(changed)})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    @classmethod
    def from_value(cls: type[OptionsT], value: Any) -> OptionsT:
        """The options of ``value``: an instance, a registered name, or a dict ``{"name": ..., option: value}``."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            value = {"name": value}
        names = ", ".join(repr(n) for n in cls.registry)
        if not isinstance(value, dict) or value.get("name") not in cls.registry:
            shown = value.get("name") if isinstance(value, dict) else value
            raise ValueError(f"{cls.kind}={shown!r} is not supported; use one of {names}.")
        options = {k: v for k, v in value.items() if k != "name"}
        chosen = cls.registry[value["name"]]
        unknown = sorted(set(options) - {f.name for f in fields(chosen)})
        if unknown:
            allowed = ", ".join(f.name for f in fields(chosen)) or "none"
            raise ValueError(f"{cls.kind}={value['name']!r} has no option {unknown[0]!r}; its options: {allowed}.")
        return chosen(**options)  # type: ignore[return-value]


@dataclass(frozen=True)
class VariantOptions(RuleOptions):
    """Options of an ascent rule (``SAMConfig.variant``). A variant combines with ``m`` or ``reweight`` only where
    it says so: the variants need the plain batch gradient at w and at w + eps, which those replace."""

    kind: ClassVar[str] = "variant"
    registry: ClassVar[dict[str, type[RuleOptions]]] = {}
    combines_with_m: ClassVar[bool] = False
    combines_with_reweight: ClassVar[bool] = False
    needs_first_pass: ClassVar[bool] = True  # False: eps comes before the step's only pass (Momentum-SAM)
    needs_outputs: ClassVar[bool] = False  # the forward returns (per-instance losses, outputs) (MESA)
    selects_instances: ClassVar[bool] = False  # the second pass runs on chosen rows of the batch (ESAM)

    def counts_steps(self) -> bool:
        """Whether the rule counts optimizer steps or keeps state across them (then it cannot see micro-batches)."""
        return True

    def sharding_refusal(self, flat: bool) -> tuple[str, str] | None:
        """(what cannot be right, what works instead) under sharded parameters (``flat``: FSDP1's flat ones)."""
        return None


@dataclass(frozen=True)
class WeightingOptions(RuleOptions):
    """Options of a first-pass weighting (``SAMConfig.reweight``): which weights delta-SAM puts on the instances."""

    kind: ClassVar[str] = "reweight"
    registry: ClassVar[dict[str, type[RuleOptions]]] = {}
    hooks_layers: ClassVar[bool] = False  # whether it hooks the model's layers (needs the module)

    def step_probe_scope(self) -> str:
        """Where the step's probes run: ``"all"`` parameters unless the weighting probes the head."""
        return "all"


@dataclass(frozen=True)
class Neighbourhood:
    """The radius and shape every rule perturbs with: SAM's ``rho``, ASAM's ``adaptive`` and ``eta``, which a
    parameter group may override with its own values."""

    rho: float
    adaptive: bool
    eta: float
