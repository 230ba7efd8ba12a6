"""The core of the SAM-family step every adapter runs (:meth:`SAMEngine.step`, the two-step API, the backward
closure): exact restore of w on every way out, the finite check with DDP agreement and the skip, the base step, the
step count and the checkpoint, around the first-pass weighting (:mod:`.firstpass`) and the ascent rule
(:mod:`.ascent`, with the per-instance route of ``m``). A full step: first pass at w -> one all-reduce -> the rule's
eps -> second pass at w + eps -> restore w -> the rule's descent gradient -> finite check -> base step -> the rule's
after-step. A step the rule does not perturb (``interval``, LookSAM's k, rho = 0) is one pass."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .ascent import make_rule
from .ascent.base import Ascent, grads_of
from .ascent.per_instance import PerInstanceRoute
from .backend import Backend
from .config import SAMConfig
from .distributed import Shards, checked_shards, local_tensors
from .firstpass import FirstPass
from .guard import Guard
from .passes import Passes, Pending, backward_closure_error, two_step_error
from .profiler import phase
from .restore import BufferPool, Snapshot, clear_grads
from .rule_state import load_rule_state, save_rule_state
from .stats import StepStats
from .teacher import teacher_term


class SAMEngine:
    """The two-pass step over the parameters of ``param_groups`` (a base optimizer's, shared live)."""

    def __init__(
        self, param_groups: list[dict[str, Any]], config: SAMConfig, base_state: Callable[[], Any] | None = None
    ) -> None:
        """``base_state()`` gives the base optimizer's per-parameter ``state`` (the rules that read it: Momentum-SAM)."""
        self.param_groups, self.config = param_groups, config
        self.first = FirstPass(  # the first-pass weighting of config.reweight (firstpass/)
            config.weighting, self.params, seed=config.seed, eta=config.eta, verify=config.verify
        )
        self.rule = make_rule(config.variant, config.neighbourhood)  # the ascent rule of config.variant (ascent/)
        self.per_instance = PerInstanceRoute(config.m, config.match_rho, config.verify)  # the route of option m
        self.pool = BufferPool()  # the snapshot's buffers, kept across steps
        self.rule.base_state, self.rule.seed = base_state or dict, config.seed or 0
        self.guard = Guard(self.rule, param_groups)  # the finite check, the skip, the base step, the step count
        self._pending: Pending | None = None
        self.shards = Shards()  # how the parameters are split over ranks (FSDP), found at each step's start
        self._shards_key: tuple[int, ...] = ()
        self.names: dict[int, str] = {}  # id(parameter) -> its name in the model, when an adapter knows the model

    @property
    def steps(self) -> int:
        """Optimizer steps taken, skips included (the rule's step index)."""
        return self.guard.steps

    @property
    def skipped_steps(self) -> int:
        return self.guard.skipped_steps

    def step(self, passes: Passes, base_step: Callable[[], Any]) -> StepStats:
        """One full step over ``passes`` (the forwards); ``base_step()`` applies the descent gradient in ``.grad``.
        w is restored exactly even if a pass raises."""
        params, plain = self._begin()
        backend, head = passes.backend, passes.head
        if plain:
            term = teacher_term(self.rule, self.config.variant, params, passes, self.pool)  # MESA's KL term
            with phase("first_pass"):
                loss, losses = passes.descent(term)
            self._pending = Pending(StepStats(loss=loss, losses=losses), None, plain=True)
            return self.second_step(backend, base_step, loss)
        if self.config.m is not None:
            radii = self.per_instance.radii(self.param_groups, self.rule.group_options)
            return self.per_instance.step(
                params, passes, backend, base_step, radii=radii, guard=self.guard, pool=self.pool
            )
        ascent = self.rule.ascent_without_pass(self.param_groups, params)
        if ascent is not None:
            return self._step_from_state(ascent, passes, base_step)
        if head is not None and self.shards.sharded:  # (the config's refusal covers probe_scope='head' itself)
            raise ValueError(
                f"a head probe needs whole weights, which {self.shards.name} does not hold: use probe_scope='all'."
            )
        local = local_tensors(params)
        snapshot = self.pool.snapshot(local, backend.buffers())
        stats = self.first.run(passes, local, snapshot, head)
        # an adapter's own SAM first pass is each rank's mean loss: the sum over ranks is W times the mean
        per_rank_mean = passes.first_pass is not None and not self.config.reweighting
        ascent = self._ascent(params, backend, per_rank_mean=per_rank_mean)
        snapshot.keep_buffers()  # the first pass's statistics are the ones kept
        assert stats.loss is not None
        self._ascend(ascent, bool(torch.isfinite(stats.loss)), backend, stats, snapshot)
        second = lambda: self.rule.second_pass(passes, stats.losses)  # noqa: E731
        loss1 = self._second_pass(second)[0] if not self._pending.skip else None  # type: ignore[union-attr]
        if loss1 is not None:
            with phase("statistics"):
                stats.loss_rise = float(loss1.float() - stats.loss.float())
        return self.second_step(backend, base_step, loss1)

    def _step_from_state(self, ascent: Ascent, passes: Passes, base_step: Callable[[], Any]) -> StepStats:
        """eps formed before any pass (Momentum-SAM): the one pass at w + eps (its running statistics kept), w restored,
        the base step; the loss logged is the one at w + eps."""
        stats, snapshot = StepStats(loss=None), self.pool.snapshot(local_tensors(self.params()), [])
        self._ascend(ascent, True, passes.backend, stats, snapshot)
        if not self._pending.skip:  # type: ignore[union-attr]
            stats.loss, stats.losses = self._second_pass(passes.descent)
        return self.second_step(passes.backend, base_step, stats.loss)

    def first_step(self, backend: Backend) -> None:
        """First half around a caller's own passes (davda54/sam's): eps from the gradient in ``.grad`` now (the
        caller's backward, all-reduced by DDP if any), w <- w + eps. A non-finite gradient makes the step a skip."""
        if self._pending is not None:
            raise two_step_error("twice")
        self.config.check_two_step()
        params, plain = self._begin(zero=False)
        if plain:
            self._pending = Pending(StepStats(loss=None), None, plain=True)
        else:
            self._ascend(self._ascent(params, backend, reduce=False), True, backend, StepStats(loss=None), None)
        if not self._pending.skip:  # type: ignore[union-attr]
            # the gradient at w is taken: the backward at w + eps starts from zero, whether or not the caller
            # zeroes it. A skip leaves the non-finite gradient, so a GradScaler's inf check sees it.
            self.zero_grad(params)

    def second_step(self, backend: Backend, base_step: Callable[[], Any], loss: Tensor | None = None) -> StepStats:
        """Second half: w restored bit for bit, the rule's descent gradient, the base step on it; skipped if it (or
        ``loss``, the caller's loss at w + eps) is not finite."""
        pending = self._pending
        if pending is None:
            raise two_step_error("no first")
        self.restore_pending()
        params = self.params()
        if pending.skip:
            return self.guard.skip_step(params, pending.stats, backend, base_step, "the first pass")
        if all(p.grad is None for p in params):
            raise two_step_error("no gradient")
        backend.unscale_descent_()
        (self.rule.plain_descent_ if pending.plain else self.rule.descent_)(params)
        return self.guard.finish(params, pending.stats, backend, base_step, loss)

    def restore_pending(self) -> None:
        """Put back w (and the running statistics) a :meth:`first_step` perturbed, if any; forget that step."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.snapshot is not None:
            pending.snapshot.restore()

    def closure_step(
        self, closure: Callable[[], Any], backend: Backend, base_step: Callable[[], Any]
    ) -> tuple[StepStats, Any]:
        """:meth:`first_step`, ``closure()`` (the caller's backward at w + eps), :meth:`second_step`; w is restored
        whatever ``closure`` does. Returns the stats and the closure's value."""
        self.first_step(backend)
        loss = self._second_pass(closure)
        if all(p.grad is None for p in self.params()) and self._pending is not None and not self._pending.skip:
            self.restore_pending()
            raise backward_closure_error(loss)
        return self.second_step(backend, base_step, loss.detach() if isinstance(loss, Tensor) else None), loss

    # ---------------------------------------------------------------- the phases every path runs
    def _begin(self, zero: bool = True) -> tuple[list[Tensor], bool]:
        """(the trainable parameters, whether the step is plain: not perturbed, its one pass the descent); the rule
        forgets what a failed step left; ``zero``: the gradients cleared for the engine's own first pass."""
        params = self.params()
        if not params:
            raise ValueError("The optimizer holds no parameter with requires_grad=True: nothing to train.")
        self._find_shards(params)
        self.rule.discard()
        self.rule.step = self.steps
        if zero:
            self.zero_grad(params)
        return params, not self.perturbs()

    def _ascent(
        self, params: list[Tensor], backend: Backend, reduce: bool = True, per_rank_mean: bool = False
    ) -> Ascent:
        """The rule's eps from the first-pass gradient (unscaled), summed over ranks in one coalesced all-reduce
        (averaged when each rank's is a mean; as it is without ``reduce``: the caller's backward reduced it).
        Under FSDP the backward has already averaged each shard over ranks: the sum is W times that."""
        with torch.no_grad(), phase("ascent_norm"):
            with_grad, grads = grads_of(params)
            backend.unscale_ascent_(grads)
            if self.shards.sharded:
                if reduce and not per_rank_mean and self.shards.world_size > 1:
                    torch._foreach_mul_(grads, float(self.shards.world_size))
            elif reduce:
                backend.reducer.sum_coalesced_(grads)
                if per_rank_mean and backend.reducer.world_size > 1:
                    torch._foreach_div_(grads, float(backend.reducer.world_size))
            return self.rule.ascent_of(self.param_groups, with_grad, grads)

    def _ascend(self, ascent: Ascent, finite: bool, backend: Backend, stats: StepStats, snapshot: Snapshot | None):
        """Every rank agrees eps is finite (else the step is pending as a skip), then w <- w + eps."""
        if not self.guard.agree_finite(math.isfinite(ascent.norm) and finite, backend):
            self._pending = Pending(stats, None, skip=True)
            return
        snapshot = snapshot or self.pool.snapshot(local_tensors(self.params()), backend.buffers())
        with snapshot.restoring_on_error():
            stats.eps_norm = self.rule.perturb_(ascent)
        self._pending = Pending(stats, snapshot)

    def _second_pass(self, run: Callable[[], Any]) -> Any:
        """The pass at w + eps (``run``, a backward inside), from no gradient; w restored if it raises."""
        try:
            self.zero_grad(self.params())
            with torch.enable_grad(), phase("second_pass"):
                return run()
        except BaseException:
            self.restore_pending()
            raise

    def _find_shards(self, params: list[Tensor]) -> None:
        """How ``params`` are sharded (found once per parameter set), refusing what sharding does not support."""
        key = tuple(id(p) for p in params)
        if key != self._shards_key:
            self.shards, self._shards_key = checked_shards(params, self.config.sharding_refusal), key
            self.rule.shards = self.shards
            self.first.noise.rank = self.shards.rank if self.shards.sharded else None  # each rank its own stream

    def perturbs(self) -> bool:
        """Whether this step perturbs: the rule's schedule (LookSAM's k, ``interval``) and some rho > 0."""
        return self.rule.perturbs(self.steps) and self.rule.enabled(self.param_groups)

    def params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    zero_grad = staticmethod(clear_grads)

    def state_dict(self) -> dict[str, Any]:
        """The step count, the probe generators and the rule's per-parameter state (by name: :mod:`.rule_state`)."""
        return {
            "generators": self.first.noise.state_dict(),
            "skipped_steps": self.skipped_steps,
            "steps": self.steps,
            "rule": save_rule_state(self.rule.state, self.param_groups, self.names),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.guard.skipped_steps, self.guard.steps = int(state.get("skipped_steps", 0)), int(state.get("steps", 0))
        self.rule.state = load_rule_state(state.get("rule", {}), self.param_groups, self.names)
        self.rule.discard()
        self.first.noise.load_state_dict(state.get("generators", {}))

    def name_parameters(self, module: nn.Module | None) -> None:
        """Key the rule's checkpointed state by ``module``'s parameter names (robust to freezing a layer)."""
        if module is not None:
            self.names = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
