"""The one SAM / delta-SAM step every adapter (optimizer, mixin, callback) runs.

Order of a step (DELTASAM.md sections 1, 3, 5):
probes (forward only, at w + dw_k, dropout masks replayed) -> first pass at w (per-instance
losses, weighted backward) -> all-reduce of the weighted gradient -> eps = rho g/||g||
(ASAM: rho T^2 g/||T g||) -> second pass at w + eps -> exact restore of w -> base step.
The adapters differ only in how they run backward, all-reduce and step: a :class:`Backend`.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Optional

import torch
from torch import Tensor

from .config import SAMConfig
from .distributed import Reducer, default_reducer
from .weighting import ProbeLosses, Weights, compute_weights, instance_scores, uniform_weights, weight_stats

if TYPE_CHECKING:
    from .head_probe import HeadProbe

LossFn = Callable[[], Tensor]


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
    """What one step measured, for logging. ``loss`` is the mean loss at the unperturbed w."""

    loss: Tensor
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


class _RNGReplay:
    """Replays one RNG state, so probes and the first pass draw the same dropout masks."""

    def __init__(self, devices: set[torch.device]) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}

    def rewind(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in self.cuda.items():
            torch.cuda.set_rng_state(s, d)


class SAMEngine:
    """The two-pass step over the parameters of ``param_groups`` (a base optimizer's, shared live)."""

    def __init__(self, param_groups: list[dict[str, Any]], config: SAMConfig) -> None:
        self.param_groups = param_groups
        self.config = config
        self.skipped_steps = 0
        self.accumulate_grad_batches = 1
        self._acc: Optional[list[Tensor]] = None
        self._acc_count = 0
        self._acc_poisoned = False
        self._stores: dict[str, list[Tensor]] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._pending_generator_states: dict[str, Tensor] = {}
        self._warned_skip = False

    # ----------------------------------------------------------------- state
    def params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def generator(self, device: torch.device) -> torch.Generator:
        """The probe-noise generator for ``device``'s type: seeded identically on every rank."""
        key = device.type
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.config.seed)
            if key in self._pending_generator_states:
                gen.set_state(self._pending_generator_states.pop(key))
            self._generators[key] = gen
        return self._generators[key]

    def state_dict(self) -> dict[str, Any]:
        gens = {k: g.get_state() for k, g in self._generators.items()}
        gens.update({k: v for k, v in self._pending_generator_states.items() if k not in gens})
        return {"generators": gens, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._pending_generator_states = {}
        for key, st in state.get("generators", {}).items():
            if key in self._generators:
                self._generators[key].set_state(st.cpu() if isinstance(st, Tensor) else st)
            else:
                self._pending_generator_states[key] = st.cpu() if isinstance(st, Tensor) else st

    # ------------------------------------------------------------ primitives
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

    @staticmethod
    def zero_grad(params: list[Tensor]) -> None:
        for p in params:
            p.grad = None

    def ascent(self, params: list[Tensor], grads: list[Tensor]) -> tuple[list[Tensor], float]:
        """The ascent direction d and its normalizer: eps = rho d / norm.

        SAM: d = g, norm = ||g||; ASAM: d = T^2 g, norm = ||T g||, T = |w| + eta. One host sync (the norm).
        """
        if self.config.adaptive:
            scale = torch._foreach_abs(params)
            torch._foreach_add_(scale, self.config.eta)
            direction = torch._foreach_mul(grads, scale)  # T g
            norm = _global_norm(direction)
            torch._foreach_mul_(direction, scale)  # T (T g)
            return direction, norm
        return grads, _global_norm(grads)

    def perturbation(self, params: list[Tensor], grads: list[Tensor]) -> tuple[list[Tensor], float]:
        """eps = rho d/norm as tensors, and the norm (a zero gradient gives eps = 0, never NaN)."""
        direction, norm = self.ascent(params, grads)
        factor = self.config.rho / norm if norm > 0 else 0.0
        return torch._foreach_mul(direction, factor), norm

    def probe_noise(self, params: list[Tensor]) -> list[Tensor]:
        """dw = sigma z (absolute) or sigma z * (|w| + eta) (relative), z ~ N(0, I) from the seeded generator."""
        cfg = self.config
        device = params[0].device
        numels = [p.numel() for p in params]
        flat = torch.randn(sum(numels), generator=self.generator(device), device=device, dtype=torch.float32)
        noise = [z.view_as(p) if z.dtype == p.dtype else z.view_as(p).to(p.dtype) for z, p in zip(flat.split(numels), params)]
        if cfg.probe_scale == "relative":
            mag = torch._foreach_abs(params)
            torch._foreach_add_(mag, cfg.eta)
            torch._foreach_mul_(noise, mag)
        torch._foreach_mul_(noise, cfg.probe_std)
        return noise

    def run_probes(self, params: list[Tensor], backup: list[Tensor], forward: LossFn, backend: Backend, rng: _RNGReplay) -> ProbeLosses:
        """K forward-only evaluations of the per-instance losses at w + dw_k (and w - dw_k if antithetic)."""
        plus, minus = [], []
        with torch.no_grad(), backend.forward_context():
            for _ in range(self.config.num_probes):
                noise = self.probe_noise(params)
                torch._foreach_add_(params, noise)
                rng.rewind()
                plus.append(forward().detach().float())
                if self.config.antithetic:
                    torch._foreach_add_(params, noise, alpha=-2.0)
                    rng.rewind()
                    minus.append(forward().detach().float())
                torch._foreach_copy_(params, backup)
        return ProbeLosses(torch.stack(plus), torch.stack(minus) if minus else None)

    def run_head_probes(self, head: "HeadProbe") -> ProbeLosses:
        """K probes of the head alone, functional (no live weight changes), on the first pass's features.

        All K (and their antithetic twins) are evaluated in one vmapped call of the head.
        """
        cfg = self.config
        base = [p.detach() for p in head.params]
        noises = [self.probe_noise(base) for _ in range(cfg.num_probes)]
        stacked = [torch.stack(ns) for ns in zip(*noises)]  # per parameter: [K, *shape]
        points = [b.unsqueeze(0) + n for b, n in zip(base, stacked)]
        if cfg.antithetic:
            points = [torch.cat([pt, b.unsqueeze(0) - n]) for pt, b, n in zip(points, base, stacked)]
        with torch.no_grad():
            losses = head.batched_losses(points).float()
        k = cfg.num_probes
        return ProbeLosses(losses[:k], losses[k:] if cfg.antithetic else None)

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
        head: Optional["HeadProbe"] = None,
        window_end: bool = True,
    ) -> StepStats:
        """One full step. ``forward()`` returns per-instance losses [B] at the current weights.

        ``first_pass`` / ``second_pass`` replace the engine's own forward+backward of a pass
        (they run backward themselves and return the mean loss): the callback uses them to
        run Lightning's closure. ``head`` (with ``probe_scope="head"``) probes the top layers only,
        after the first pass. With ``accumulate_grad_batches`` > 1 the descent gradient is accumulated and
        the base step runs when ``window_end`` (the mean over the window; a non-finite micro-batch skips
        the whole window). Weights are restored exactly even if a pass raises.
        """
        cfg = self.config
        params = self.params()
        if not params:
            raise ValueError("The optimizer holds no parameter with requires_grad=True: nothing to train.")
        self.zero_grad(params)

        def checked_forward() -> Tensor:
            assert forward is not None
            return check_per_sample_losses(forward(), source, batch_size)

        def descent_pass() -> tuple[Tensor, Optional[Tensor]]:
            """Forward + backward of the mean loss at the current weights: (mean loss, per-instance losses or None)."""
            if second_pass is not None:
                return second_pass().detach(), None
            with backend.forward_context():
                losses = checked_forward()
            backend.backward(losses.mean())
            return losses.detach().mean(), losses.detach()

        if not cfg.enabled:  # rho = 0: the base optimizer's step, one pass
            loss, losses = descent_pass()
            return self._finish(params, StepStats(loss=loss, losses=losses), backend, base_step, window_end)

        reducer = backend.reducer
        buffers = backend.buffers()
        with torch.no_grad():
            buffer_backup = self._saved("buffers", buffers)
            backup = self._saved("params", params)
        probes: Optional[ProbeLosses] = None
        rng: Optional[_RNGReplay] = None
        head_scope = cfg.uses_probes and head is not None
        if cfg.uses_probes and cfg.probe_scope == "head" and head is None:
            raise ValueError("probe_scope='head' needs a head probe: the module must define the split methods (see head_probe).")
        if cfg.uses_probes and not head_scope:
            if forward is None:
                raise ValueError(f"score={cfg.score!r} needs per-instance losses: define per_sample_loss.")
            rng = _RNGReplay({p.device for p in params})
            try:
                probes = self.run_probes(params, backup, forward, backend, rng)
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(params, backup)
                    if buffers:
                        torch._foreach_copy_(buffers, buffer_backup)
            rng.rewind()

        # ---- first pass at w: the (weighted) gradient whose direction becomes eps
        weights: Optional[Weights] = None
        losses0: Optional[Tensor] = None
        with backend.no_sync():
            if first_pass is not None and not cfg.reweighting:
                loss0 = first_pass().detach()
            else:
                if forward is None:
                    raise ValueError("reweight='delta' needs per-instance losses: define per_sample_loss.")
                with backend.forward_context():
                    losses0 = checked_forward()
                loss0 = losses0.detach().mean()
                if cfg.reweighting:
                    if head_scope:
                        assert head is not None
                        probes = self.run_head_probes(head)
                    scores = instance_scores(cfg, losses0, probes, cfg.probe_std, reducer)
                    weights = compute_weights(scores, cfg, reducer)
                else:
                    weights = uniform_weights(losses0.numel(), losses0.device, reducer)
                backend.backward((weights.delta.to(losses0.dtype) * losses0).sum())
        grads_params = [p for p in params if p.grad is not None]
        grads = [p.grad for p in grads_params]
        with torch.no_grad():
            if buffers:
                torch._foreach_copy_(buffer_backup, buffers)  # the first pass's statistics are the ones kept
            reducer.sum_coalesced_(grads)
            direction, norm = self.ascent(grads_params, grads)
        stats = StepStats(loss=loss0, losses=None if losses0 is None else losses0.detach())
        if weights is not None and cfg.reweighting:
            stats.weight_entropy, stats.weight_max = weight_stats(weights.delta, reducer)
            stats.weight_fallback = weights.fallback
        if not self._agree_finite(math.isfinite(norm) and bool(torch.isfinite(loss0)), backend):
            return self._skip(params, stats, backend, base_step, "the first pass", window_end)

        perturbed = [backup[i] for i, p in enumerate(params) if p.grad is not None]
        factor = cfg.rho / norm if norm > 0 else 0.0
        try:
            with torch.no_grad():
                torch._foreach_add_(grads_params, direction, alpha=factor)  # w + eps, no eps tensor allocated
            stats.eps_norm = factor * (_global_norm(direction) if cfg.adaptive else norm)
            self.zero_grad(params)
            loss1, _ = descent_pass()
        finally:
            with torch.no_grad():
                torch._foreach_copy_(grads_params, perturbed)
                if buffers:
                    torch._foreach_copy_(buffers, buffer_backup)
        stats.loss_rise = float(loss1.float() - loss0.float())
        return self._finish(params, stats, backend, base_step, window_end)

    def _finish(self, params: list[Tensor], stats: StepStats, backend: Backend, base_step: Callable[[], Any],
                window_end: bool) -> StepStats:
        """Apply (or accumulate) the descent gradient unless its loss or gradient is non-finite."""
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.stack(torch._foreach_norm(grads)).float().sum() if grads else torch.zeros(())
        if not self._agree_finite(bool(torch.isfinite(total)) and bool(torch.isfinite(stats.loss)), backend):
            return self._skip(params, stats, backend, base_step, "the descent pass", window_end)
        if self.accumulate_grad_batches == 1:
            base_step()
            return stats
        self._accumulate(params)
        if window_end:
            self._end_window(params, stats, backend, base_step)
        else:
            self.zero_grad(params)
        return stats

    def _accumulate(self, params: list[Tensor]) -> None:
        if self._acc is None:
            self._acc = [torch.zeros_like(p) for p in params]
        self._acc_count += 1
        with torch.no_grad():
            present = [(a, p.grad) for a, p in zip(self._acc, params) if p.grad is not None]
            if present:
                torch._foreach_add_([a for a, _ in present], [g for _, g in present])

    def _end_window(self, params: list[Tensor], stats: StepStats, backend: Backend, base_step: Callable[[], Any]) -> None:
        """The one optimizer step of an accumulation window: the mean of its micro-batches' descent gradients."""
        acc, count, poisoned = self._acc, self._acc_count, self._acc_poisoned
        self._acc, self._acc_count, self._acc_poisoned = None, 0, False
        if poisoned or acc is None:
            stats.skipped = True
            backend.skip(params, base_step)
            self.zero_grad(params)
            return
        with torch.no_grad():
            torch._foreach_div_(acc, float(count))
        for p, a in zip(params, acc):
            p.grad = a
        base_step()

    def _agree_finite(self, finite: bool, backend: Backend) -> bool:
        """Whether every rank found its values finite (so all ranks skip together, whatever ``sync``)."""
        if backend.world.world_size == 1:
            return finite
        flag = backend.world.sum_(torch.tensor([0.0 if finite else 1.0], device=self.params()[0].device))
        return float(flag.item()) == 0.0

    def _skip(self, params: list[Tensor], stats: StepStats, backend: Backend, base_step: Callable[[], Any], where: str,
              window_end: bool = True) -> StepStats:
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
        if self.accumulate_grad_batches > 1:
            self._acc_poisoned = True  # the window's step is skipped as a whole
            if window_end:
                self._end_window(params, stats, backend, base_step)
            self.zero_grad(params)
            return stats
        backend.skip(params, base_step)
        self.zero_grad(params)
        return stats

    # -------------------------------------------------------------- clipping
    def clip_gradients(self, value: Optional[float], algorithm: str, loss_scale: float = 1.0) -> None:
        """Clip the descent gradient by norm or by value; thresholds follow a loss scale (scaled grads)."""
        if value is None or value <= 0:
            return
        grads_params = [p for p in self.params() if p.grad is not None]
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(grads_params, value * loss_scale, foreach=True)
        else:
            torch.nn.utils.clip_grad_value_(grads_params, value * loss_scale, foreach=True)


def make_backend(config: SAMConfig, buffers: Optional[Callable[[], list[Tensor]]] = None) -> Backend:
    """The plain-PyTorch backend, all-reducing over torch.distributed when sync='global' and W > 1."""
    return Backend(default_reducer(config.sync), buffers, world=default_reducer("global"))


def _global_norm(tensors: list[Tensor]) -> float:
    """||concat(tensors)||_2 as a Python float (one host sync); 0 for an empty list."""
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(tensors)])))
