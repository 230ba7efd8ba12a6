"""The core of the one SAM-family step every adapter (optimizer, mixin, callback) runs: :meth:`SAMEngine.step`,
the two-step API (:meth:`~SAMEngine.first_step` / :meth:`~SAMEngine.second_step`) and :meth:`~SAMEngine.closure_step`.

The core owns what every variant shares: snapshot and exact restore of w on every way out (:mod:`.parts`),
the finite check with DDP agreement and the skip, the base step, the step count and the checkpoint. It
calls its parts at fixed points of each path: the first-pass weighting (:mod:`.firstpass`: uniform, probes,
exact / sketched Gram), the ascent rule (:mod:`.ascent`: SAM / ASAM and the variants, by ``variant``:
whether the step perturbs, eps from g, the descent gradient from g and g_p, what follows the base step) and
the per-instance route of ``m`` (:mod:`.ascent.per_instance`).

Order of a full step: probes -> first pass at w -> all-reduce of the weighted gradient -> the rule's eps ->
second pass at w + eps -> exact restore of w -> the rule's descent gradient -> finite check -> base step ->
the rule's after-step. A step the rule does not perturb (``interval``, LookSAM's k, rho = 0) is one pass.
Parameter groups may carry their own ``rho``, ``adaptive`` and ``eta``. Every phase runs inside a
``deltasam.<phase>`` profiler range while a ``torch.profiler`` records.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .ascent import make_rule
from .ascent.base import grads_of
from .ascent.per_instance import PerInstanceRoute
from .config import SAMConfig, check_bool, check_number
from .firstpass import FirstPass
from .gram import GramCapture
from .instance import InstancePerturbation
from .parts import (  # noqa: F401  (re-exported: the engine's public names before the split)
    Ascent,
    Backend,
    Passes,
    Pending,
    Snapshot,
    StepStats,
    check_per_sample_losses,
    make_backend,
    norm_of,
    phase,
)
from .probes import HeadProbe, LossFn, ProbeNoise


class SAMEngine:
    """The two-pass step over the parameters of ``param_groups`` (a base optimizer's, shared live)."""

    def __init__(self, param_groups: list[dict[str, Any]], config: SAMConfig) -> None:
        self.param_groups = param_groups
        self.config = config
        self.first = FirstPass(config, self.params)  # the first-pass weighting: uniform, probes, Gram
        self.per_instance = PerInstanceRoute(config)  # the route of option m
        self.rule = make_rule(config)  # the ascent rule of config.variant (lightning_deltasam/ascent/)
        self.skipped_steps = 0
        self.steps = 0  # optimizer steps taken (skips included): the rule's step index
        self._stores: dict[str, list[Tensor]] = {}
        self._warned_skip = False
        self._pending: Pending | None = None

    @property
    def noise(self) -> ProbeNoise:
        """The probe generators (the first pass's; checkpointed here)."""
        return self.first.noise

    # ------------------------------------------------------------------ step
    def step(
        self,
        forward: LossFn | None,
        backend: Backend,
        base_step: Callable[[], Any],
        *,
        first_pass: Callable[[], Tensor] | None = None,
        second_pass: Callable[[], Tensor] | None = None,
        batch_size: int | None = None,
        source: str = "the closure",
        head: HeadProbe | None = None,
        module: nn.Module | None = None,
    ) -> StepStats:
        """One full step. ``forward()`` returns per-instance losses [B] at the current weights.

        ``first_pass`` / ``second_pass`` replace the engine's own forward+backward of a pass
        (they run backward themselves and return the mean loss): the callback uses them to
        run Lightning's closure. ``module`` is the model whose layers ``estimator="exact"`` hooks.
        ``head`` (with ``probe_scope="head"``) probes the top layers only,
        after the first pass. ``base_step()`` applies the descent gradient left in ``.grad``.
        Weights are restored exactly even if a pass raises.
        """
        cfg = self.config
        params, plain = self._begin()
        self.zero_grad(params)
        passes = Passes(forward, first_pass, second_pass, backend, source, batch_size, module)
        if plain:  # a step that does not perturb (rho = 0 in every group, interval, LookSAM's k): one pass
            with phase("first_pass"):
                loss, losses = passes.descent()
            self._pending = Pending(StepStats(loss=loss, losses=losses), None, plain=True)
            return self.second_step(backend, base_step, loss)
        if cfg.m is not None:
            return self.per_instance.step(self, params, passes, backend, base_step)
        if cfg.step_probe_scope == "head" and head is None:
            raise ValueError(
                "probe_scope='head' needs a head probe: the module must define the split methods (see probes)."
            )
        snapshot = self._snapshot(params, backend.buffers())
        probes = self.first.probes(params, snapshot, passes) if cfg.uses_probes and head is None else None
        with phase("first_pass"):
            stats = self.first.run(passes, probes, head)
        # an adapter's own first pass (the callback's SAM) is each rank's mean loss: the sum over ranks is W times the mean
        ascent = self._ascent_direction(params, backend, per_rank_mean=first_pass is not None and not cfg.reweighting)
        snapshot.keep_buffers()  # the first pass's statistics are the ones kept
        assert stats.loss is not None
        self._ascend(ascent, bool(torch.isfinite(stats.loss)), backend, stats, snapshot)
        loss1 = self._second_pass(passes.descent)[0] if not self._pending.skip else None  # type: ignore[union-attr]
        if loss1 is not None:
            with phase("statistics"):
                stats.loss_rise = float(loss1.float() - stats.loss.float())
        return self.second_step(backend, base_step, loss1)

    # ------------------------------------------------------- two-step API
    def first_step(self, backend: Backend) -> None:
        """First half of the step around a caller's own passes (davda54/sam's ``first_step``).

        The gradient at w is the one in ``.grad`` now (the caller's backward, already all-reduced by
        DDP if any): eps from it, w <- w + eps. The caller then runs its backward at w + eps and
        calls :meth:`second_step`. A non-finite gradient perturbs nothing and makes that step a skip.
        """
        if self._pending is not None:
            raise RuntimeError(
                "first_step() was called twice in a row: call second_step() (it restores w and steps) "
                "before the next first_step()."
            )
        if self.config.m is not None:
            raise ValueError(
                f"m={self.config.m} needs per-instance losses and the model, which first_step()/second_step() and "
                "a closure that calls backward() itself do not give: use step(closure) with closure() returning "
                "the per-instance losses, shape [B], and pass the model (DeltaSAM(..., module=model)); or m=None."
            )
        if self.config.reweighting:
            raise ValueError(
                "reweight='delta' needs per-instance losses, which first_step()/second_step() and a closure that "
                "calls backward() itself do not give: use step(closure) with closure() returning the "
                "per-instance losses, shape [B] (or reweight=None for SAM / ASAM)."
            )
        params, plain = self._begin()
        if plain:
            self._pending = Pending(StepStats(loss=None), None, plain=True)
        else:
            self._ascend(self._ascent_direction(params, None), True, backend, StepStats(loss=None), None)

    def second_step(self, backend: Backend, base_step: Callable[[], Any], loss: Tensor | None = None) -> StepStats:
        """Second half: w restored bit for bit, the rule's descent gradient, then the base step on it (taken at
        w + eps by the caller), skipped if it (or ``loss``, the caller's loss at w + eps) is not finite."""
        pending = self._pending
        if pending is None:
            raise RuntimeError(
                "second_step() needs a first_step() before it (first_step perturbs w, second_step restores it)."
            )
        self.restore_pending()
        params = self.params()
        if pending.skip:
            return self.skip_step(params, pending.stats, backend, base_step, "the first pass")
        if pending.plain:
            self.rule.plain_descent_(params)
        else:
            self.rule.descent_(params)
        return self.finish(params, pending.stats, backend, base_step, loss)

    def restore_pending(self) -> None:
        """Put back w (and the running statistics) a :meth:`first_step` perturbed, if any; forget that step."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.snapshot is not None:
            pending.snapshot.restore()

    def closure_step(
        self, closure: Callable[[], Any], backend: Backend, base_step: Callable[[], Any]
    ) -> tuple[StepStats, Any]:
        """:meth:`first_step`, ``closure()`` (the caller's forward + backward at w + eps, the gradient at w already in
        ``.grad``), :meth:`second_step`; w is restored whatever ``closure`` does. Returns the stats and closure's value."""
        self.first_step(backend)
        loss = self._second_pass(closure)
        checked = loss.detach() if isinstance(loss, Tensor) else None
        return self.second_step(backend, base_step, checked), loss

    # ---------------------------------------------------------------- the phases every path runs
    def _begin(self) -> tuple[list[Tensor], bool]:
        """Phase 1: (the trainable parameters, whether the step is plain: the rule does not perturb it, so its one
        pass gives the descent gradient at w); the rule forgets anything a failed step left."""
        params = self.params()
        if not params:
            raise ValueError("The optimizer holds no parameter with requires_grad=True: nothing to train.")
        self.rule.discard()
        return params, not self.perturbs()

    def _ascend(
        self, ascent: Ascent, finite: bool, backend: Backend, stats: StepStats, snapshot: Snapshot | None
    ) -> None:
        """Phase 2: every rank agrees eps is finite (else the step is pending as a skip), then w <- w + eps."""
        if not self.agree_finite(math.isfinite(ascent.norm) and finite, backend):
            self._pending = Pending(stats, None, skip=True)
            return
        if snapshot is None:
            snapshot = self._snapshot(self.params(), backend.buffers())
        with snapshot.restoring_on_error():
            stats.eps_norm = self.rule.perturb_(ascent)
        self._pending = Pending(stats, snapshot)

    def _second_pass(self, run: Callable[[], Any]) -> Any:
        """Phase 3: the pass at w + eps (``run``, a backward inside), from no gradient; w restored if it raises."""
        try:
            self.zero_grad(self.params())
            with torch.enable_grad(), phase("second_pass"):
                return run()
        except BaseException:
            self.restore_pending()
            raise

    # ---------------------------------------------------------------- phases
    def _snapshot(self, params: list[Tensor], buffers: list[Tensor]) -> Snapshot:
        with torch.no_grad(), phase("backup"):
            return Snapshot(params, self.saved("params", params), buffers, self.saved("buffers", buffers))

    def _ascent_direction(self, params: list[Tensor], backend: Backend | None, per_rank_mean: bool = False) -> Ascent:
        """The first-pass gradient (all-reduced by ``backend``'s reducer, averaged when each rank's is a mean; as it is
        without one) as the rule's eps, per group."""
        with torch.no_grad(), phase("ascent_norm"):
            with_grad_all, grads = grads_of(params)
            if backend is not None:
                backend.reducer.sum_coalesced_(grads)
                if per_rank_mean and backend.reducer.world_size > 1:
                    torch._foreach_div_(grads, float(backend.reducer.world_size))
            along = dict(zip(with_grad_all, self.rule.gradient_at_w(with_grad_all, grads)))  # the rule sees g at w
            groups = []
            for index, group in enumerate(self.param_groups):
                with_grad = [p for p in group["params"] if p.requires_grad and p.grad is not None]
                if with_grad:
                    groups.append((with_grad, [along[p] for p in with_grad], *self.group_options(index)))
            return self.rule.ascent(groups)

    def ascent(self, params: list[Tensor], grads: list[Tensor]) -> tuple[list[Tensor], float]:
        """The ascent direction d and its normalizer with the config's options: eps = rho d / norm (see the rule)."""
        direction, norms = self.rule.direction(params, grads, self.config.adaptive, self.config.eta)
        return direction, norm_of(norms)

    def perturb_(self, params: list[Tensor], direction: list[Tensor], norm: float) -> float:
        """w <- w + rho d / norm with the config's rho and adaptive (see :meth:`ascent`); returns ||eps||."""
        norms = None if self.config.adaptive else list(torch._foreach_norm(direction))
        return self.rule.perturb_(Ascent([(params, direction, self.config.rho, norms)], norm))

    def enabled(self) -> bool:
        """Whether the step perturbs at all: some group's rho (the config's unless the group sets its own) > 0."""
        return any(self.group_options(i)[0] > 0 for i in range(len(self.param_groups)))

    def perturbs(self) -> bool:
        """Whether this step perturbs: the rule's schedule (LookSAM's k, ``interval``) and some rho > 0."""
        return self.rule.perturbs(self.steps) and self.enabled()

    def group_options(self, index: int) -> tuple[float, bool, float]:
        """(rho, adaptive, eta) of ``param_groups[index]``: the group's own values override the config's."""
        group, cfg = self.param_groups[index], self.config
        rho, adaptive, eta = group.get("rho", cfg.rho), group.get("adaptive", cfg.adaptive), group.get("eta", cfg.eta)
        if (rho, adaptive, eta) != (cfg.rho, cfg.adaptive, cfg.eta):  # validated here: a schedule may write them
            check_number(f"param_groups[{index}]['rho']", rho, minimum=0.0)
            check_bool(f"param_groups[{index}]['adaptive']", adaptive)
            check_number(f"param_groups[{index}]['eta']", eta, minimum=0.0)
        return self.rule.radius(group, float(rho)), adaptive, float(eta)

    def finish(
        self,
        params: list[Tensor],
        stats: StepStats,
        backend: Backend,
        base_step: Callable[[], Any],
        loss: Tensor | None,
    ) -> StepStats:
        """The base step on the descent gradient, unless it or ``loss`` (the descent loss) is non-finite (then skipped)."""
        with phase("finite_check"):
            grads = [p.grad for p in params if p.grad is not None] + self.rule.pending_tensors()
            total = torch.stack(torch._foreach_norm(grads)).float().sum() if grads else torch.zeros(())
            if loss is not None:
                total = (
                    total + loss.detach().float().sum() * 0.0
                )  # NaN / inf in the loss stays NaN: one check, one sync
            finite = self.agree_finite(bool(torch.isfinite(total)), backend)
        if not finite:
            return self.skip_step(params, stats, backend, base_step, "the descent pass")
        with phase("base_step"):
            base_step()
            self.rule.after_step(self.param_groups)  # WSAM's decoupled update; the rule's state is committed
        self.steps += 1
        return stats

    def agree_finite(self, finite: bool, backend: Backend) -> bool:
        """Whether every rank found its values finite (so all ranks skip together, whatever ``sync``)."""
        if backend.world.world_size == 1:
            return finite
        flag = backend.world.sum_(torch.tensor([0.0 if finite else 1.0], device=self.params()[0].device))
        return float(flag.item()) == 0.0

    def skip_step(
        self, params: list[Tensor], stats: StepStats, backend: Backend, base_step: Callable[[], Any], where: str
    ) -> StepStats:
        self.skipped_steps += 1
        stats.skipped = True
        if not self._warned_skip:
            warnings.warn(
                f"delta-SAM skipped a step: non-finite loss or gradient in {where}. The weights were left "
                "unchanged; skipped steps are counted in 'deltasam/skipped_steps' (warned once).",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_skip = True
        backend.skip(params, base_step)
        self.rule.discard()
        self.steps += 1
        self.zero_grad(params)
        return stats

    # ----------------------------------------------------------------- state
    def params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    @staticmethod
    def zero_grad(params: list[Tensor]) -> None:
        for p in params:
            p.grad = None

    def saved(self, key: str, tensors: list[Tensor]) -> list[Tensor]:
        """A copy of ``tensors`` in buffers kept across steps (no allocation once shapes settle)."""
        store = self._stores.get(key)
        if (
            store is None
            or len(store) != len(tensors)
            or any(s.shape != t.shape or s.dtype != t.dtype or s.device != t.device for s, t in zip(store, tensors))
        ):
            store = [t.detach().clone() for t in tensors]
            self._stores[key] = store
        elif tensors:
            torch._foreach_copy_(store, [t.detach() for t in tensors])
        return store

    def state_dict(self) -> dict[str, Any]:
        return {
            "generators": self.noise.state_dict(),
            "skipped_steps": self.skipped_steps,
            "steps": self.steps,
            "rule": self.rule.state_dict(self.params()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.steps = int(state.get("steps", 0))
        self.rule.load_state_dict(state.get("rule", {}), self.params())
        self.noise.load_state_dict(state.get("generators", {}))

    # ------------------------------------------------------------ the parts' hooks, by their former names
    def gram_capture(self, module: nn.Module | None) -> GramCapture:
        """The first pass's Gram hooks over ``module`` (see :meth:`FirstPass.gram_capture`)."""
        return self.first.gram_capture(module)

    def instance_route(self, module: nn.Module | None) -> InstancePerturbation:
        """The per-instance route's hooks over ``module`` (see :meth:`PerInstanceRoute.route`)."""
        return self.per_instance.route(self, module)
