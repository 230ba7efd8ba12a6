"""The ascent rule the core calls: how eps is formed from the gradient at w, and the descent gradient from the
gradients at w and w + eps. :class:`SAM` is SAM / ASAM (and composer's every-k-steps SAM); a variant subclasses
it in one file, overriding only the hooks its mathematics needs, and registers itself with :func:`register`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..distributed import Shards, local_tensors, norm_of
from ..options import Neighbourhood, VariantOptions, check_bool, check_int, check_number
from ..passes import Passes
from ..profiler import phase

RULES: dict[type[VariantOptions], type[SAM]] = {}
EPS = 1e-12  # pytorch_optimizer's perturb_eps: the variants' guard against dividing by a zero norm


def register(options: type[VariantOptions]) -> Callable[[type[SAM]], type[SAM]]:
    """Class decorator: the rule that ``options`` (a :class:`~lightning_deltasam.options.VariantOptions`) builds."""

    def add(cls: type[SAM]) -> type[SAM]:
        RULES[options] = cls
        return cls

    return add


def make_rule(options: VariantOptions, neighbourhood: Neighbourhood) -> SAM:
    """The rule of ``options`` (the registry is filled by importing :mod:`lightning_deltasam.ascent`)."""
    return RULES[type(options)](options, neighbourhood)


@dataclass(frozen=True)
class SAMOptions(VariantOptions, name="sam"):
    """SAM / ASAM (the neighbourhood is SAMConfig's ``rho``, ``adaptive``, ``eta``).

    Args:
        interval: perturb only every interval-th step (composer's SAM), a plain base step otherwise.
    """

    combines_with_m = True
    combines_with_reweight = True
    interval: int = 1

    def check(self) -> None:
        check_int("interval", self.interval, minimum=1, hint=" It perturbs every interval-th step; 1 is every step.")

    def counts_steps(self) -> bool:
        return self.interval > 1


@dataclass
class AscentGroup:
    """One parameter group's share of eps: its parameters (with a gradient) move by ``rho * direction / norm``.
    ``norms`` are the per-tensor norms of ``direction`` for SAM groups (``direction`` is the gradient), None for
    ASAM groups (their normalizer is ||T g||, not ||d||)."""

    params: list[Tensor]
    direction: list[Tensor]
    rho: float
    norms: list[Tensor] | None


@dataclass
class Ascent:
    """The first-pass gradient as eps: each group moves by rho_k d_k / ``norm``, the norm over every group."""

    groups: list[AscentGroup]
    norm: float


@register(SAMOptions)
class SAM:
    """SAM: eps = rho g/||g||, descend on g_p; ASAM (adaptive): eps = rho T^2 g/||T g||, T = |w| + eta.
    With ``interval=k`` only the steps where (step + 1) % k == 0 perturb (composer's SAM)."""

    keeps_gradient = False  # whether descent_ needs g at w (then kept in pending["g"])
    seed = 0  # SAMConfig's seed (set by the engine): the rules that draw (ESAM)
    step = 0  # the optimizer step being taken (0-based, skips counted), set by the engine at each step's start
    options: VariantOptions

    def __init__(self, options: VariantOptions, neighbourhood: Neighbourhood) -> None:
        self.options, self.neighbourhood = options, neighbourhood
        self.state: dict[Tensor, dict[str, Tensor]] = {}  # committed per-parameter state (checkpointed)
        self.pending: dict[str, Any] = {}  # this step's values, committed only when its base step runs
        self.shards = Shards()  # set by the engine each step: how the parameters are split over ranks
        self.base_state: Callable[[], Any] = dict  # the base optimizer's per-parameter state, given by the engine

    # ---------------------------------------------------------------- hooks (identity for SAM)
    def perturbs(self, step: int) -> bool:
        """Whether step ``step`` (0-based count of optimizer steps) perturbs at all."""
        interval = self.options.interval if isinstance(self.options, SAMOptions) else 1
        return (step + 1) % interval == 0

    def radius(self, group: dict[str, Any], rho: float) -> float:
        """This step's rho for ``group`` (its own or the config's is ``rho``)."""
        return rho

    def ascent_without_pass(self, param_groups: list[dict[str, Any]], params: list[Tensor]) -> Ascent | None:
        """eps before any pass at w, for a rule that forms it from state (Momentum-SAM); None: from the first pass."""
        return None

    def teacher_weights(self, params: list[Tensor]) -> list[Tensor] | None:
        """Weights whose outputs enter the one pass's loss (MESA's EMA; see ``outputs_term``); None: none."""
        return None

    def outputs_term(self, outputs: Tensor, teacher_outputs: Tensor | None) -> Tensor:
        raise NotImplementedError  # the loss's term from the outputs at w and at the teacher's (MESA's KL)

    def second_pass(self, passes: Passes, losses_at_w: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The forward and backward at w + eps (``losses_at_w``: the first pass's, when known): (mean loss, losses)."""
        return passes.descent()

    def gradient_at_w(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """Sees the (all-reduced) gradient at w before eps is formed; returns the gradient eps is along."""
        if self.keeps_gradient:
            self.pending["g"] = dict(zip(params, torch._foreach_mul(grads, 1.0)))
        return grads

    def gradient_pair(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(the parameters with both gradients, g at w as kept, g_p in their ``.grad``) for ``descent_``."""
        saved = self.pending.get("g", {})
        both, gp = grads_of([p for p in params if p in saved])
        return both, [saved[p] for p in both], gp

    def descent_(self, params: list[Tensor]) -> None:
        """After the pass at w + eps (``.grad`` holds g_p, w restored): turn ``.grad`` into the descent gradient."""

    def plain_descent_(self, params: list[Tensor]) -> None:
        """A step that does not perturb: ``.grad`` holds g at w; turn it into the descent gradient."""

    def pending_tensors(self) -> list[Tensor]:
        """Tensors the base step's finite check must also cover (values applied outside ``.grad``)."""
        return []

    def after_step(self, param_groups: list[dict[str, Any]]) -> None:
        """After the base step ran (not on a skipped step): commit this step's state."""
        self.pending.clear()

    def discard(self) -> None:
        """Forget this step's uncommitted values (a skipped or failed step)."""
        self.pending.clear()

    # ---------------------------------------------------------------- per-group options and eps
    def group_options(self, param_groups: list[dict[str, Any]], index: int) -> tuple[float, bool, float]:
        """(rho, adaptive, eta) of ``param_groups[index]`` this step: the group's own values override the config's."""
        group, base = param_groups[index], self.neighbourhood
        rho, adaptive, eta = (
            group.get("rho", base.rho),
            group.get("adaptive", base.adaptive),
            group.get("eta", base.eta),
        )
        if (rho, adaptive, eta) != (base.rho, base.adaptive, base.eta):  # validated here: a schedule may write them
            check_number(f"param_groups[{index}]['rho']", rho, minimum=0.0)
            check_bool(f"param_groups[{index}]['adaptive']", adaptive)
            check_number(f"param_groups[{index}]['eta']", eta, minimum=0.0)
        return self.radius(group, float(rho)), adaptive, float(eta)

    def enabled(self, param_groups: list[dict[str, Any]]) -> bool:
        """Whether some group's rho (its own or the config's) is > 0."""
        return any(self.group_options(param_groups, i)[0] > 0 for i in range(len(param_groups)))

    def ascent_of(self, param_groups: list[dict[str, Any]], params: list[Tensor], grads: list[Tensor]) -> Ascent:
        """eps from the (all-reduced) first-pass gradients ``grads`` of ``params``, with each group's options."""
        along = dict(zip(params, self.gradient_at_w(params, grads)))  # the rule sees g at w
        groups = []
        for index, group in enumerate(param_groups):
            with_grad = [p for p in group["params"] if p.requires_grad and p.grad is not None]
            if with_grad:  # eps is formed on the local tensors (a shard of each under FSDP)
                grads = [along[p] for p in with_grad]
                rho, adaptive, eta = self.group_options(param_groups, index)
                groups.append((local_tensors(with_grad), grads, rho, adaptive, eta))
        return self.ascent(groups)

    # ---------------------------------------------------------------- the SAM / ASAM direction
    @staticmethod
    def direction(
        params: list[Tensor], grads: list[Tensor], adaptive: bool, eta: float
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(d, the per-tensor norms of the normalizer's vector): SAM d = g, normalizer g; ASAM d = T^2 g, normalizer T g."""
        if adaptive:
            scale = torch._foreach_abs(params)
            torch._foreach_add_(scale, eta)
            direction = torch._foreach_mul(grads, scale)  # T g
            norms = torch._foreach_norm(direction)
            torch._foreach_mul_(direction, scale)  # T (T g)
            return list(direction), list(norms)
        return grads, list(torch._foreach_norm(grads))

    def ascent(self, groups: list[tuple[list[Tensor], list[Tensor], float, bool, float]]) -> Ascent:
        """eps from (parameters, the gradient eps is along, rho, adaptive, eta) per group: group k moves by
        rho_k d_k / ||d||, the norm over every group (as davda54/sam and pytorch_optimizer). One host sync."""
        out, norms = [], []
        for params, grads, rho, adaptive, eta in groups:
            direction, tensor_norms = self.direction(params, grads, adaptive, eta)
            out.append(AscentGroup(params, direction, rho, None if adaptive else tensor_norms))
            norms.extend(tensor_norms)
        return Ascent(out, norm_of(norms, self.shards))

    @torch.no_grad()
    def perturb_(self, ascent: Ascent) -> float:
        """w <- w + eps (a zero gradient gives eps = 0, never NaN), no eps tensor allocated; returns ||eps||."""
        if not ascent.norm > 0:
            return 0.0
        with phase("perturb"):
            for group in ascent.groups:
                torch._foreach_add_(group.params, group.direction, alpha=group.rho / ascent.norm)
        with phase("statistics"):
            if len(ascent.groups) == 1 and ascent.groups[0].norms is not None:
                return ascent.groups[0].rho  # SAM, one radius: ||eps|| = rho exactly, no pass needed
            squares = [
                (g.rho / ascent.norm) ** 2
                * norm_of(g.norms if g.norms is not None else list(torch._foreach_norm(g.direction)), self.shards) ** 2
                for g in ascent.groups
            ]
            return math.sqrt(sum(squares))


def grads_of(params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """(the parameters with a gradient, their gradients as the local tensors the step computes on: a DTensor
    gradient's local shard under FSDP2, sharing its storage, so in-place changes reach ``.grad``)."""
    with_grad = [p for p in params if p.grad is not None]
    return with_grad, local_tensors([p.grad for p in with_grad])  # type: ignore[misc]
