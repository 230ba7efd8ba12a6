"""The one SAM / delta-SAM step every adapter (optimizer, mixin, callback) runs: :meth:`SAMEngine.step`.

Order of a step (DELTASAM.md sections 1, 3, 5):
probes (forward only, at w + dw_k, dropout masks replayed) -> first pass at w (per-instance
losses, weighted backward) -> all-reduce of the weighted gradient -> eps = rho g/||g||
(ASAM: rho T^2 g/||T g||) -> second pass at w + eps -> exact restore of w -> base step.
The adapters differ only in how they run backward, all-reduce and step: a :class:`Backend`.
Probes are in :mod:`.probes`, the scores and weights in :mod:`.weighting`. With ``estimator="exact"``
(or ``"sketch"``) the first pass is a backward to the layers' outputs instead: per-instance gradient
Gram matrix, weights, and the weighted gradient book-kept by :mod:`.gram`.

Parameter groups may carry their own ``rho``, ``adaptive`` and ``eta`` (they override the
config's, as in davda54/sam and pytorch_optimizer): group k moves by rho_k d_k / ||d||, the norm
taken over every group. :meth:`SAMEngine.first_step` / :meth:`SAMEngine.second_step` split the
same step around a caller's own backward at w + eps (the peers' two-step API).
Every phase runs inside a ``deltasam.<phase>`` profiler range while a ``torch.profiler`` records.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch
from torch import Tensor, nn

from .config import SAMConfig, check_bool, check_number
from .distributed import Reducer, default_reducer
from .probes import HeadProbe, LossFn, ProbeNoise, RNGReplay, full_probes, head_probes
from .gram import GramCapture
from .instance import InstancePerturbation
from .ascent import make_rule
from .ascent.base import grads_of
from .weighting import ProbeLosses, Weights, compute_weights, gram_scores, instance_scores, uniform_weights, weight_stats


def _phase(name: str) -> ContextManager:
    """A ``deltasam.<name>`` profiler range while a profiler records; otherwise nothing (no cost)."""
    return torch.profiler.record_function(f"deltasam.{name}") if torch._C._autograd._profiler_enabled() else nullcontext()


class Backend:
    """How an adapter runs backward, collectives and a skipped step. This default is plain PyTorch."""

    def __init__(self, reducer: Reducer, buffers: Optional[Callable[[], list[Tensor]]] = None,
                 world: Optional[Reducer] = None) -> None:
        self.reducer = reducer  # collectives of the step: identity under sync='local'
        self.world = world if world is not None else reducer  # every rank, whatever sync: skip agreement
        self._buffers = buffers

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def no_sync(self) -> ContextManager:
        """Context in which a backward does not all-reduce gradients (DDP's no_sync)."""
        return nullcontext()

    def forward_context(self) -> ContextManager:
        """Context for the engine's own forwards (autocast, where the caller's context lacks it)."""
        return nullcontext()

    def buffers(self) -> list[Tensor]:
        """Running statistics (BatchNorm and the like) that only the first pass may update."""
        return self._buffers() if self._buffers is not None else []

    def loss_scale(self) -> float:
        """Factor the backward multiplies gradients by (a GradScaler's scale), 1 without one."""
        return 1.0

    def skip(self, params: list[Tensor], base_step: Callable[[], Any]) -> None:
        """A step whose gradients are not finite: the base step runs with no gradient, so nothing changes
        but the step is counted (schedulers and step counters stay aligned with a normal step)."""
        for p in params:
            p.grad = None
        base_step()


@dataclass
class StepStats:
    """What one step measured, for logging. ``loss`` is the mean loss at the unperturbed w (None when the
    step did not see it: the two-step API, whose first backward is the caller's)."""

    loss: Optional[Tensor]
    losses: Optional[Tensor] = None
    eps_norm: float = 0.0
    loss_rise: float = float("nan")
    weight_entropy: float = float("nan")
    weight_max: float = float("nan")
    weight_fallback: bool = False
    skipped: bool = False

    def as_log_dict(self, skipped_total: int) -> dict[str, float]:
        out = {"deltasam/skipped_steps": float(skipped_total)}
        if not math.isnan(self.loss_rise):
            out["deltasam/eps_norm"] = self.eps_norm
            out["deltasam/loss_rise"] = self.loss_rise
        if not math.isnan(self.weight_entropy):
            out["deltasam/weight_entropy"] = self.weight_entropy
            out["deltasam/weight_max"] = self.weight_max
            out["deltasam/weight_fallback"] = float(self.weight_fallback)
        return out


def check_per_sample_losses(losses: Any, source: str, batch_size: Optional[int] = None) -> Tensor:
    """A clear error unless ``losses`` is a float tensor of shape [B] (B = ``batch_size`` when known)."""
    if not isinstance(losses, Tensor):
        raise TypeError(f"{source} must return a tensor of per-instance losses of shape [B]; got {type(losses).__name__}.")
    shape = tuple(losses.shape)
    if losses.dim() != 1:
        hint = " (a scalar: use reduction='none')" if losses.dim() == 0 else ""
        raise ValueError(f"{source} must return per-instance losses of shape [B]; got shape {shape}{hint}.")
    if not losses.is_floating_point():
        raise TypeError(f"{source} must return a floating-point tensor; got dtype {losses.dtype} of shape {shape}.")
    if losses.numel() == 0:
        raise ValueError(f"{source} returned an empty tensor of shape {shape}: the batch is empty.")
    if batch_size is not None and losses.numel() != batch_size:
        raise ValueError(f"{source} returned shape {shape} but the batch holds {batch_size} instances; return one loss per instance.")
    return losses


class _Snapshot:
    """w and the running statistics as the step found them; :meth:`restore` puts them back bit for bit."""

    def __init__(self, params: list[Tensor], saved: list[Tensor], buffers: list[Tensor], saved_buffers: list[Tensor]) -> None:
        self.params, self.saved, self.buffers, self.saved_buffers = params, saved, buffers, saved_buffers

    @torch.no_grad()
    def restore(self, buffers: bool = True) -> None:
        with _phase("restore"):
            if self.params:
                torch._foreach_copy_(self.params, self.saved)
            if buffers and self.buffers:
                torch._foreach_copy_(self.buffers, self.saved_buffers)

    @torch.no_grad()
    def keep_buffers(self) -> None:
        """The running statistics as they are now (after the first pass) become the ones restored."""
        if self.buffers:
            torch._foreach_copy_(self.saved_buffers, self.buffers)

    @contextmanager
    def restoring_on_error(self) -> Iterator[None]:
        """An exception inside restores w and the statistics before it propagates."""
        try:
            yield
        except BaseException:
            self.restore()
            raise

    @contextmanager
    def restoring(self) -> Iterator[None]:
        """Whatever happens inside (a return, a NaN, an exception), w and the statistics are restored on the way out."""
        try:
            yield
        finally:
            self.restore()


@dataclass
class _Ascent:
    """The first-pass gradient as eps: group k (its parameters with a gradient) moves by rho_k d_k / norm.

    ``norms`` are the per-tensor norms of ``direction`` for SAM groups (``direction`` is the gradient),
    None for ASAM groups (their normalizer is ||T g||, not ||d||)."""

    groups: list[tuple[list[Tensor], list[Tensor], float, Optional[list[Tensor]]]]
    norm: float


@dataclass
class _Pending:
    """What :meth:`SAMEngine.first_step` leaves for :meth:`SAMEngine.second_step`."""

    stats: StepStats
    snapshot: Optional[_Snapshot]  # None: nothing was perturbed (rho = 0, a step the rule does not perturb, or a skip)
    skip: bool = False
    plain: bool = False  # the step does not perturb: the caller's second gradient is at w


@dataclass
class _Passes:
    """The forwards of one step: the engine's own (``forward``) or an adapter's (``first_pass`` / ``second_pass``)."""

    forward: Optional[LossFn]
    first_pass: Optional[Callable[[], Tensor]]
    second_pass: Optional[Callable[[], Tensor]]
    backend: Backend
    source: str
    batch_size: Optional[int]
    module: Optional[nn.Module] = None

    def losses(self, needed_for: str) -> Tensor:
        """Per-instance losses [B] at the current weights, checked, with grad."""
        if self.forward is None:
            raise ValueError(f"{needed_for} needs per-instance losses: define per_sample_loss.")
        with self.backend.forward_context():
            return check_per_sample_losses(self.forward(), self.source, self.batch_size)

    def descent(self) -> tuple[Tensor, Optional[Tensor]]:
        """Forward + backward of the mean loss at the current weights: (mean loss, per-instance losses or None)."""
        if self.second_pass is not None:
            return self.second_pass().detach(), None
        losses = self.losses("the step")
        self.backend.backward(losses.mean())
        return losses.detach().mean(), losses.detach()


class SAMEngine:
    """The two-pass step over the parameters of ``param_groups`` (a base optimizer's, shared live)."""

    def __init__(self, param_groups: list[dict[str, Any]], config: SAMConfig) -> None:
        self.param_groups = param_groups
        self.config = config
        self.noise = ProbeNoise(config)
        self.rule = make_rule(config)  # the ascent rule of config.variant (lightning_deltasam/ascent/)
        self.skipped_steps = 0
        self.steps = 0  # optimizer steps taken (skips included): the rule's step index
        self._stores: dict[str, list[Tensor]] = {}
        self._warned_skip = False
        self._pending: Optional[_Pending] = None
        self._gram: Optional[tuple[tuple[int, ...], GramCapture]] = None
        self._instance: Optional[tuple[tuple[int, ...], InstancePerturbation]] = None

    # ------------------------------------------------------------------ step
    def step(
        self,
        forward: Optional[LossFn],
        backend: Backend,
        base_step: Callable[[], Any],
        *,
        first_pass: Optional[Callable[[], Tensor]] = None,
        second_pass: Optional[Callable[[], Tensor]] = None,
        batch_size: Optional[int] = None,
        source: str = "the closure",
        head: Optional[HeadProbe] = None,
        module: Optional[nn.Module] = None,
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
        params = self.params()
        if not params:
            raise ValueError("The optimizer holds no parameter with requires_grad=True: nothing to train.")
        self.zero_grad(params)
        self.rule.discard()
        passes = _Passes(forward, first_pass, second_pass, backend, source, batch_size, module)
        if not self.perturbs():  # rho = 0 in every group, or a step the rule does not perturb: one pass
            with _phase("first_pass"):
                loss, losses = passes.descent()
            self.rule.plain_descent_(params)
            return self._finish(params, StepStats(loss=loss, losses=losses), backend, base_step, loss)
        if cfg.m is not None:
            return self._instance_step(params, passes, backend, base_step)
        if cfg.step_probe_scope == "head" and head is None:
            raise ValueError("probe_scope='head' needs a head probe: the module must define the split methods (see probes).")

        snapshot = self._snapshot(params, backend.buffers())
        probes = self._full_probes(params, snapshot, passes) if cfg.uses_probes and head is None else None
        with _phase("first_pass"):
            stats = self._first_pass(passes, probes, head)
        # an adapter's own first pass (the callback's SAM) is each rank's mean loss: the sum over ranks is W times the mean
        ascent = self._ascent_direction(params, backend, per_rank_mean=first_pass is not None and not cfg.reweighting)
        snapshot.keep_buffers()  # the first pass's statistics are the ones kept
        assert stats.loss is not None
        if not self._agree_finite(math.isfinite(ascent.norm) and bool(torch.isfinite(stats.loss)), backend):
            return self._skip(params, stats, backend, base_step, "the first pass")
        with snapshot.restoring():
            stats.eps_norm = self._perturb(ascent)
            self.zero_grad(params)
            with _phase("second_pass"):
                loss1, _ = passes.descent()
        self.rule.descent_(params)
        with _phase("statistics"):
            stats.loss_rise = float(loss1.float() - stats.loss.float())
        return self._finish(params, stats, backend, base_step, loss1)

    # ------------------------------------------------------- two-step API
    def first_step(self, backend: Backend) -> None:
        """First half of the step around a caller's own passes (davda54/sam's ``first_step``).

        The gradient at w is the one in ``.grad`` now (the caller's backward, already all-reduced by
        DDP if any): eps from it, w <- w + eps. The caller then runs its backward at w + eps and
        calls :meth:`second_step`. A non-finite gradient perturbs nothing and makes that step a skip.
        """
        if self._pending is not None:
            raise RuntimeError("first_step() was called twice in a row: call second_step() (it restores w and steps) "
                               "before the next first_step().")
        if self.config.m is not None:
            raise ValueError(f"m={self.config.m} needs per-instance losses and the model, which first_step()/second_step() and "
                             "a closure that calls backward() itself do not give: use step(closure) with closure() returning "
                             "the per-instance losses, shape [B], and pass the model (DeltaSAM(..., module=model)); or m=None.")
        if self.config.reweighting:
            raise ValueError("reweight='delta' needs per-instance losses, which first_step()/second_step() and a closure that "
                             "calls backward() itself do not give: use step(closure) with closure() returning the "
                             "per-instance losses, shape [B] (or reweight=None for SAM / ASAM).")
        params = self.params()
        if not params:
            raise ValueError("The optimizer holds no parameter with requires_grad=True: nothing to train.")
        stats = StepStats(loss=None)
        self.rule.discard()
        if not self.perturbs():
            self._pending = _Pending(stats, None, plain=True)
            return
        ascent = self._ascent_direction(params, None)
        if not self._agree_finite(math.isfinite(ascent.norm), backend):
            self._pending = _Pending(stats, None, skip=True)
            return
        snapshot = self._snapshot(params, backend.buffers())
        with snapshot.restoring_on_error():
            stats.eps_norm = self._perturb(ascent)
        self._pending = _Pending(stats, snapshot)

    def second_step(self, backend: Backend, base_step: Callable[[], Any], loss: Optional[Tensor] = None) -> StepStats:
        """Second half: w restored bit for bit, then the base step on the gradient in ``.grad`` (taken at
        w + eps by the caller), skipped if it (or ``loss``, the caller's loss at w + eps) is not finite."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("second_step() needs a first_step() before it (first_step perturbs w, second_step restores it).")
        self.restore_pending()
        params = self.params()
        if pending.skip:
            return self._skip(params, pending.stats, backend, base_step, "the first pass")
        if pending.plain:
            self.rule.plain_descent_(params)
        else:
            self.rule.descent_(params)
        return self._finish(params, pending.stats, backend, base_step, loss)

    def restore_pending(self) -> None:
        """Put back w (and the running statistics) a :meth:`first_step` perturbed, if any; forget that step."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.snapshot is not None:
            pending.snapshot.restore()

    def closure_step(self, closure: Callable[[], Any], backend: Backend, base_step: Callable[[], Any]) -> tuple[StepStats, Any]:
        """:meth:`first_step`, ``closure()`` (the caller's forward + backward at w + eps, the gradient at w already in
        ``.grad``), :meth:`second_step`; w is restored whatever ``closure`` does. Returns the stats and closure's value."""
        self.first_step(backend)
        try:
            self.zero_grad(self.params())
            with torch.enable_grad(), _phase("second_pass"):
                loss = closure()
        except BaseException:
            self.restore_pending()
            raise
        checked = loss.detach() if isinstance(loss, Tensor) else None
        return self.second_step(backend, base_step, checked), loss

    # ---------------------------------------------------------------- phases
    def _snapshot(self, params: list[Tensor], buffers: list[Tensor]) -> _Snapshot:
        with torch.no_grad(), _phase("backup"):
            return _Snapshot(params, self._saved("params", params), buffers, self._saved("buffers", buffers))

    def _full_probes(self, params: list[Tensor], snapshot: _Snapshot, passes: _Passes) -> ProbeLosses:
        """Probes of every parameter, before the first pass, which then replays the probes' dropout masks."""
        if passes.forward is None:
            raise ValueError(f"score={self.config.score!r} needs per-instance losses: define per_sample_loss.")
        rng = RNGReplay({p.device for p in params})
        with snapshot.restoring(), _phase("probes"):
            probes = full_probes(self.config, params, self.noise, passes.forward, rng,
                                 lambda: snapshot.restore(buffers=False), passes.backend.forward_context)
        rng.rewind()
        return probes

    def _first_pass(self, passes: _Passes, probes: Optional[ProbeLosses], head: Optional[HeadProbe]) -> StepStats:
        """Backward of sum_i delta_i l_i at w (delta uniform for SAM), its gradient unreduced: the direction of eps."""
        cfg = self.config
        reducer = passes.backend.reducer
        with passes.backend.no_sync():
            if passes.first_pass is not None and not cfg.reweighting:
                return StepStats(loss=passes.first_pass().detach())
            weights: Weights
            if cfg.uses_gram:
                losses, weights = self._gram_pass(passes)
            else:
                losses = passes.losses("reweight='delta'" if cfg.reweighting else "the step")
                if cfg.reweighting:
                    if head is not None and cfg.uses_probes:
                        probes = head_probes(cfg, head, self.noise)
                    weights = compute_weights(instance_scores(cfg, losses, probes, cfg.probe_std, reducer), cfg, reducer)
                else:
                    weights = uniform_weights(losses.numel(), losses.device, reducer)
                passes.backend.backward((weights.delta.to(losses.dtype) * losses).sum())
        stats = StepStats(loss=losses.detach().mean(), losses=losses.detach())
        if cfg.reweighting:
            with _phase("statistics"):
                stats.weight_entropy, stats.weight_max = weight_stats(weights.delta, reducer)
            stats.weight_fallback = weights.fallback
        return stats

    def _gram_pass(self, passes: _Passes) -> tuple[Tensor, Weights]:
        """estimator 'exact' / 'sketch': one forward, one backward to the layers' outputs, weights from the
        per-instance gradient Gram matrix, and g_delta = sum_i delta_i g_i book-kept into ``.grad``."""
        cfg, reducer = self.config, passes.backend.reducer
        capture = self.gram_capture(passes.module)
        try:
            with capture.record(passes.batch_size):
                losses = passes.losses(f"estimator={cfg.estimator!r}")
            with _phase("gram"):
                capture.backward(losses, scale=passes.backend.loss_scale())
                weights = compute_weights(gram_scores(capture.gram(), cfg, reducer), cfg, reducer)
                for p, g in capture.weighted_grads(weights.delta).items():
                    p.grad = g
        finally:
            capture.clear()
        return losses, weights

    def gram_capture(self, module: Optional[nn.Module]) -> GramCapture:
        """The hooks that form ``module``'s per-instance gradient Grams (built once per module and parameter set)."""
        if module is None:
            raise ValueError(
                f"estimator={self.config.estimator!r} hooks the model's layers: pass the model "
                "(DeltaSAM(..., module=model)); DeltaSAMMixin and DeltaSAMCallback pass it themselves."
            )
        params = self.params()
        key = (id(module), *(id(p) for p in params))
        if self._gram is None or self._gram[0] != key:
            gen = self.noise.generator(params[0].device) if self.config.estimator == "sketch" else None
            self._gram = (key, GramCapture(module, params, self.config.estimator, self.config.sketch_rank, gen))  # type: ignore[arg-type]
        return self._gram[1]

    def _instance_step(self, params: list[Tensor], passes: _Passes, backend: Backend, base_step: Callable[[], Any]) -> StepStats:
        """``m`` set: each group of m instances descends from its own w + eps_g, all in one batched second pass.

        First pass: a forward with hooks and one backward to the layers' outputs (no parameter gradient);
        ||G_g|| from what they kept. Second pass: the per-group corrections installed, a backward of the mean
        loss. w is never moved, so nothing needs restoring and no perturbation is all-reduced."""
        cfg = self.config
        route = self.instance_route(passes.module)
        rho_of = self._instance_radii()
        buffers = backend.buffers()
        snapshot = _Snapshot([], [], buffers, self._saved("buffers", buffers))
        try:
            with passes.backend.no_sync(), _phase("first_pass"):
                with route.record(passes.batch_size):
                    losses = passes.losses(f"m={cfg.m}")
                route.backward(losses, scale=backend.loss_scale())
            stats = StepStats(loss=losses.detach().mean(), losses=losses.detach())
            with torch.no_grad(), _phase("ascent_norm"):
                squares = route.group_norms_sq()
                total = torch.stack(list(squares.values())).sum(0) if squares else losses.new_zeros(1)
                finite = bool(torch.isfinite(total.sum() + stats.loss.float()))
            if not self._agree_finite(finite, backend):
                return self._skip(params, stats, backend, base_step, "the first pass")
            with torch.no_grad(), _phase("perturb"):
                norm = total.sqrt()
                inverse = torch.where(norm > 0, 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(norm))
                route.scale({p: rho_of[p] * inverse for p in squares})
                eps_sq = sum(rho_of[p] ** 2 * sq for p, sq in squares.items()) * inverse.square()
                stats.eps_norm = float(torch.as_tensor(eps_sq).sqrt().mean())
            snapshot.keep_buffers()  # the first pass's statistics are the ones kept
            self.zero_grad(params)
            with snapshot.restoring(), route.corrections(), _phase("second_pass"):
                loss1, _ = passes.descent()
        finally:
            route.clear()
        with _phase("statistics"):
            stats.loss_rise = float(loss1.float() - stats.loss.float())
        return self._finish(params, stats, backend, base_step, loss1)

    def _instance_radii(self) -> dict[Tensor, float]:
        """Each trainable parameter's rho (its group's); an ASAM group is refused (its eps_i is not low-rank)."""
        rho_of: dict[Tensor, float] = {}
        for index, group in enumerate(self.param_groups):
            rho, adaptive, _ = self.group_options(index)
            if adaptive:
                raise ValueError(
                    f"param_groups[{index}]['adaptive']=True with m={self.config.m}: ASAM's per-instance perturbation is "
                    "not low-rank, so the per-instance route cannot apply it. Set the group's adaptive to False, or m=None."
                )
            rho_of.update((p, rho) for p in group["params"] if p.requires_grad)
        return rho_of

    def instance_route(self, module: Optional[nn.Module]) -> InstancePerturbation:
        """The hooks that give each group of ``m`` instances its own perturbation (built once per module and parameter set)."""
        if module is None:
            raise ValueError(
                f"m={self.config.m} hooks the model's layers: pass the model (DeltaSAM(..., module=model)); "
                "DeltaSAMMixin and DeltaSAMCallback pass it themselves."
            )
        params = self.params()
        key = (id(module), *(id(p) for p in params))
        if self._instance is None or self._instance[0] != key:
            assert self.config.m is not None
            self._instance = (key, InstancePerturbation(module, params, self.config.m))
        return self._instance[1]

    def _ascent_direction(self, params: list[Tensor], backend: Optional[Backend], per_rank_mean: bool = False) -> _Ascent:
        """The first-pass gradient (all-reduced by ``backend``'s reducer, averaged when each rank's is a mean; as it is
        without one) as eps, per group."""
        with torch.no_grad(), _phase("ascent_norm"):
            with_grad_all, grads = grads_of(params)
            if backend is not None:
                backend.reducer.sum_coalesced_(grads)
                if per_rank_mean and backend.reducer.world_size > 1:
                    torch._foreach_div_(grads, float(backend.reducer.world_size))
            along = dict(zip(with_grad_all, self.rule.gradient_at_w(with_grad_all, grads)))  # the rule sees g at w
            groups, norms = [], []
            for index, group in enumerate(self.param_groups):
                rho, adaptive, eta = self.group_options(index)
                with_grad = [p for p in group["params"] if p.requires_grad and p.grad is not None]
                if not with_grad:
                    continue
                direction, tensor_norms = self.rule.direction(with_grad, [along[p] for p in with_grad], adaptive, eta)
                groups.append((with_grad, direction, rho, None if adaptive else tensor_norms))
                norms.extend(tensor_norms)
            return _Ascent(groups, _norm_of(norms))

    def ascent(self, params: list[Tensor], grads: list[Tensor]) -> tuple[list[Tensor], float]:
        """The ascent direction d and its normalizer with the config's options: eps = rho d / norm.

        SAM: d = g, norm = ||g||; ASAM: d = T^2 g, norm = ||T g||, T = |w| + eta. One host sync (the norm).
        """
        direction, norms = self.rule.direction(params, grads, self.config.adaptive, self.config.eta)
        return direction, _norm_of(norms)

    @torch.no_grad()
    def perturb_(self, params: list[Tensor], direction: list[Tensor], norm: float) -> float:
        """w <- w + rho d / norm with the config's rho and adaptive (see :meth:`ascent`); returns ||eps||."""
        norms = None if self.config.adaptive else list(torch._foreach_norm(direction))
        return self._perturb(_Ascent([(params, direction, self.config.rho, norms)], norm))

    @torch.no_grad()
    def _perturb(self, ascent: _Ascent) -> float:
        """w <- w + eps, group k by rho_k d_k / norm (a zero gradient gives eps = 0, never NaN), no eps tensor
        allocated; returns ||eps||."""
        if not ascent.norm > 0:
            return 0.0
        with _phase("perturb"):
            for params, direction, rho, _ in ascent.groups:
                torch._foreach_add_(params, direction, alpha=rho / ascent.norm)
        with _phase("statistics"):
            if len(ascent.groups) == 1 and ascent.groups[0][3] is not None:
                return ascent.groups[0][2]  # SAM, one radius: ||eps|| = rho exactly, no pass needed
            squares = [(rho / ascent.norm) ** 2 * _norm_of(norms if norms is not None else list(torch._foreach_norm(direction))) ** 2
                       for _, direction, rho, norms in ascent.groups]
            return math.sqrt(sum(squares))

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

    def _finish(self, params: list[Tensor], stats: StepStats, backend: Backend, base_step: Callable[[], Any],
                loss: Optional[Tensor]) -> StepStats:
        """The base step on the descent gradient, unless it or ``loss`` (the descent loss) is non-finite (then skipped)."""
        with _phase("finite_check"):
            grads = [p.grad for p in params if p.grad is not None] + self.rule.pending_tensors()
            total = torch.stack(torch._foreach_norm(grads)).float().sum() if grads else torch.zeros(())
            if loss is not None:
                total = total + loss.detach().float().sum() * 0.0  # NaN / inf in the loss stays NaN: one check, one sync
            finite = self._agree_finite(bool(torch.isfinite(total)), backend)
        if not finite:
            return self._skip(params, stats, backend, base_step, "the descent pass")
        with _phase("base_step"):
            base_step()
            self.rule.after_step(self.param_groups)  # WSAM's decoupled update; the rule's state is committed
        self.steps += 1
        return stats

    def _agree_finite(self, finite: bool, backend: Backend) -> bool:
        """Whether every rank found its values finite (so all ranks skip together, whatever ``sync``)."""
        if backend.world.world_size == 1:
            return finite
        flag = backend.world.sum_(torch.tensor([0.0 if finite else 1.0], device=self.params()[0].device))
        return float(flag.item()) == 0.0

    def _skip(self, params: list[Tensor], stats: StepStats, backend: Backend, base_step: Callable[[], Any], where: str) -> StepStats:
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

    def _saved(self, key: str, tensors: list[Tensor]) -> list[Tensor]:
        """A copy of ``tensors`` in buffers kept across steps (no allocation once shapes settle)."""
        store = self._stores.get(key)
        if store is None or len(store) != len(tensors) or any(
            s.shape != t.shape or s.dtype != t.dtype or s.device != t.device for s, t in zip(store, tensors)
        ):
            store = [t.detach().clone() for t in tensors]
            self._stores[key] = store
        elif tensors:
            torch._foreach_copy_(store, [t.detach() for t in tensors])
        return store

    def state_dict(self) -> dict[str, Any]:
        return {"generators": self.noise.state_dict(), "skipped_steps": self.skipped_steps, "steps": self.steps,
                "rule": self.rule.state_dict(self.params())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.steps = int(state.get("steps", 0))
        self.rule.load_state_dict(state.get("rule", {}), self.params())
        self.noise.load_state_dict(state.get("generators", {}))


def make_backend(config: SAMConfig, buffers: Optional[Callable[[], list[Tensor]]] = None) -> Backend:
    """The plain-PyTorch backend, all-reducing over torch.distributed when sync='global' and W > 1."""
    return Backend(default_reducer(config.sync), buffers, world=default_reducer("global"))


def _norm_of(norms: list[Tensor]) -> float:
    """||(n_1, n_2, ...)||_2 of per-tensor norms as a Python float (one host sync); 0 for an empty list."""
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))
