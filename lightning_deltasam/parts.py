"""What the core step is made of and every part shares: the :class:`Backend` an adapter gives, the
:class:`StepStats` a step returns, the :class:`Snapshot` that restores w bit for bit on every way out,
the :class:`Passes` (forwards) of one step, and the profiler ranges."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import SAMConfig
from .distributed import Reducer, Shards, default_reducer, local_tensors
from .probes import LossFn


def phase(name: str) -> AbstractContextManager:
    """A ``deltasam.<name>`` profiler range while a profiler records; otherwise nothing (no cost)."""
    return (
        torch.profiler.record_function(f"deltasam.{name}") if torch._C._autograd._profiler_enabled() else nullcontext()
    )


class Backend:
    """How an adapter runs backward, collectives and a skipped step. This default is plain PyTorch."""

    def __init__(
        self, reducer: Reducer, buffers: Callable[[], list[Tensor]] | None = None, world: Reducer | None = None
    ) -> None:
        self.reducer = reducer  # collectives of the step: identity under sync='local'
        self.world = world if world is not None else reducer  # every rank, whatever sync: skip agreement
        self._buffers = buffers

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def no_sync(self) -> AbstractContextManager:
        """Context in which a backward does not all-reduce gradients (DDP's no_sync)."""
        return nullcontext()

    def forward_context(self) -> AbstractContextManager:
        """Context for the engine's own forwards (autocast, where the caller's context lacks it)."""
        return nullcontext()

    def buffers(self) -> list[Tensor]:
        """Running statistics (BatchNorm and the like) that only the first pass may update."""
        return self._buffers() if self._buffers is not None else []

    def loss_scale(self) -> float:
        """Factor the backward multiplies gradients by (a GradScaler's scale), 1 without one."""
        return 1.0

    def unscale_ascent_(self, grads: list[Tensor]) -> None:
        """The first-pass gradients divided by the loss scale, in place, before the rule forms eps from them (the
        rules that keep g at w, GSAM, WSAM, FriendlySAM, need its true size). Nothing here: no scaler, or one that
        the adapter's own step unscales (Lightning's ``16-mixed``)."""

    def unscale_descent_(self) -> None:
        """The descent pass's gradients in ``.grad`` divided by the loss scale, in place, before the rule combines
        them with g (a GradScaler's ``unscale_``, which records its inf check). Nothing here, as above."""

    def skip(self, params: list[Tensor], base_step: Callable[[], Any]) -> None:
        """A step whose gradients are not finite: the base step runs with no gradient, so nothing changes
        but the step is counted (schedulers and step counters stay aligned with a normal step)."""
        clear_grads(params)
        base_step()


@dataclass
class StepStats:
    """What one step measured, for logging. ``loss`` is the mean loss at the unperturbed w (None when the
    step did not see it: the two-step API, whose first backward is the caller's)."""

    loss: Tensor | None
    losses: Tensor | None = None
    eps_norm: float = 0.0
    loss_rise: float = float("nan")
    weight_entropy: float = float("nan")
    weight_max: float = float("nan")
    weight_fallback: bool = False
    skipped: bool = False
    grad_norm_ratio: float = float(
        "nan"
    )  # m set: mean over instances of ||G_g||/|g| against ||g_bar|| (see instance.py)

    def as_log_dict(self, skipped_total: int) -> dict[str, float]:
        out = {"deltasam/skipped_steps": float(skipped_total)}
        if not math.isnan(self.loss_rise):
            out["deltasam/eps_norm"] = self.eps_norm
            out["deltasam/loss_rise"] = self.loss_rise
        if not math.isnan(self.weight_entropy):
            out["deltasam/weight_entropy"] = self.weight_entropy
            out["deltasam/weight_max"] = self.weight_max
            out["deltasam/weight_fallback"] = float(self.weight_fallback)
        if not math.isnan(self.grad_norm_ratio):
            out["deltasam/grad_norm_ratio"] = self.grad_norm_ratio
        return out


def check_per_sample_losses(losses: Any, source: str, batch_size: int | None = None) -> Tensor:
    """A clear error unless ``losses`` is a float tensor of shape [B] (B = ``batch_size`` when known)."""
    if not isinstance(losses, Tensor):
        raise TypeError(
            f"{source} must return a tensor of per-instance losses of shape [B]; got {type(losses).__name__}."
        )
    shape = tuple(losses.shape)
    if losses.dim() != 1:
        hint = " (a scalar: use reduction='none')" if losses.dim() == 0 else ""
        raise ValueError(f"{source} must return per-instance losses of shape [B]; got shape {shape}{hint}.")
    if not losses.is_floating_point():
        raise TypeError(f"{source} must return a floating-point tensor; got dtype {losses.dtype} of shape {shape}.")
    if losses.numel() == 0:
        raise ValueError(f"{source} returned an empty tensor of shape {shape}: the batch is empty.")
    if batch_size is not None and losses.numel() != batch_size:
        raise ValueError(
            f"{source} returned shape {shape} but the batch holds {batch_size} instances; return one loss per instance."
        )
    return losses


class Snapshot:
    """w and the running statistics as the step found them; :meth:`restore` puts them back bit for bit."""

    def __init__(
        self, params: list[Tensor], saved: list[Tensor], buffers: list[Tensor], saved_buffers: list[Tensor]
    ) -> None:
        self.params, self.saved, self.buffers, self.saved_buffers = params, saved, buffers, saved_buffers

    @torch.no_grad()
    def restore(self, buffers: bool = True) -> None:
        with phase("restore"):
            copy_all_(self.params, self.saved)
            if buffers:
                copy_all_(self.buffers, self.saved_buffers)

    @torch.no_grad()
    def keep_buffers(self) -> None:
        """The running statistics as they are now (after the first pass) become the ones restored."""
        copy_all_(self.saved_buffers, self.buffers)

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
class Ascent:
    """The first-pass gradient as eps: group k (its parameters with a gradient) moves by rho_k d_k / norm.

    ``norms`` are the per-tensor norms of ``direction`` for SAM groups (``direction`` is the gradient),
    None for ASAM groups (their normalizer is ||T g||, not ||d||)."""

    groups: list[tuple[list[Tensor], list[Tensor], float, list[Tensor] | None]]
    norm: float


@dataclass
class Pending:
    """What :meth:`SAMEngine.first_step` leaves for :meth:`SAMEngine.second_step`."""

    stats: StepStats
    snapshot: Snapshot | None  # None: nothing was perturbed (rho = 0, a step the rule does not perturb, or a skip)
    skip: bool = False
    plain: bool = False  # the step does not perturb: the caller's second gradient is at w


@dataclass
class Passes:
    """The forwards of one step: the engine's own (``forward``) or an adapter's (``first_pass`` / ``second_pass``)."""

    forward: LossFn | None
    first_pass: Callable[[], Tensor] | None
    second_pass: Callable[[], Tensor] | None
    backend: Backend
    source: str
    batch_size: int | None
    module: nn.Module | None = None

    def losses(self, needed_for: str) -> Tensor:
        """Per-instance losses [B] at the current weights, checked, with grad."""
        if self.forward is None:
            raise ValueError(f"{needed_for} needs per-instance losses: define per_sample_loss.")
        with self.backend.forward_context():
            return check_per_sample_losses(self.forward(), self.source, self.batch_size)

    def descent(self) -> tuple[Tensor, Tensor | None]:
        """Forward + backward of the mean loss at the current weights: (mean loss, per-instance losses or None)."""
        if self.second_pass is not None:
            return self.second_pass().detach(), None
        losses = self.losses("the step")
        self.backend.backward(losses.mean())
        return losses.detach().mean(), losses.detach()


def make_backend(config: SAMConfig, buffers: Callable[[], list[Tensor]] | None = None) -> Backend:
    """The plain-PyTorch backend, all-reducing over torch.distributed when sync='global' and W > 1."""
    return Backend(default_reducer(config.sync), buffers, world=default_reducer("global"))


@torch.no_grad()
def copy_all_(dst: list[Tensor], src: list[Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all i: one fused kernel, or, where a tensor type lacks it (a tensor subclass,
    e.g. a DTensor, raises there), one copy per tensor. Every copy that can be made is made before an error
    propagates, so the restore guarantee does not rest on the fused kernel."""
    if not dst:
        return
    try:
        torch._foreach_copy_(dst, src)
        return
    except Exception:  # noqa: BLE001 - any failure of the fused kernel falls back to per-tensor copies
        pass
    error: Exception | None = None
    for d, s in zip(dst, src):
        try:
            d.copy_(s)
        except Exception as err:  # noqa: BLE001 - copy the rest, then raise the first failure
            error = error or err
    if error is not None:
        raise error


def clear_grads(params: list[Tensor]) -> None:
    """``p.grad = None`` for each of ``params`` (frees the memory; the next backward allocates afresh)."""
    for p in params:
        p.grad = None


def norm_of(norms: list[Tensor], shards: Shards | None = None) -> float:
    """||(n_1, n_2, ...)||_2 of per-tensor norms as a Python float (one host sync); 0 for an empty list. Under
    sharding (``shards``) the n_i are of this rank's shards: the squares are summed over ranks in one all-reduce
    (every rank calls it, with or without tensors)."""
    if shards is not None and shards.sharded:
        device = norms[0].device if norms else torch.device("cpu")
        square = torch.stack([n.double() for n in norms]).square().sum() if norms else torch.zeros((), device=device)
        return float(shards.sum_(square.reshape(1).double()).sqrt())
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))


class BufferPool:
    """Copies of tensors in buffers kept across steps, by key (no allocation once shapes settle)."""

    def __init__(self) -> None:
        self._stores: dict[str, list[Tensor]] = {}

    def saved(self, key: str, tensors: list[Tensor]) -> list[Tensor]:
        """A copy of ``tensors`` in the pool's buffers for ``key``, reallocated only when shapes or dtypes change."""
        store = self._stores.get(key)
        if (
            store is None
            or len(store) != len(tensors)
            or any(s.shape != t.shape or s.dtype != t.dtype or s.device != t.device for s, t in zip(store, tensors))
        ):
            store = [t.detach().clone() for t in tensors]
            self._stores[key] = store
        else:
            copy_all_(store, [t.detach() for t in tensors])
        return store

    @torch.no_grad()
    def snapshot(self, params: list[Tensor], buffers: list[Tensor]) -> Snapshot:
        """w and the running statistics as they are now, in the pool's buffers."""
        with phase("backup"):
            return Snapshot(params, self.saved("params", params), buffers, self.saved("buffers", buffers))


class Guard:
    """What keeps a bad batch from moving w: the finite check every rank agrees on, the skip, the base step and the
    step count. ``rule`` is the ascent rule (its pending values are checked too and committed after the base step)."""

    def __init__(self, rule: Any, param_groups: list[dict[str, Any]]) -> None:
        self.rule, self.param_groups = rule, param_groups
        self.steps = 0  # optimizer steps taken (skips included): the rule's step index
        self.skipped_steps = 0
        self._warned = False

    def finish(
        self,
        params: list[Tensor],
        stats: StepStats,
        backend: Backend,
        base_step: Callable[[], Any],
        loss: Tensor | None,
    ) -> StepStats:
        """The base step on the descent gradient, unless it or ``loss`` (the descent loss) is non-finite (a skip)."""
        with phase("finite_check"):
            grads = local_tensors([p.grad for p in params if p.grad is not None]) + self.rule.pending_tensors()
            total = torch.stack(torch._foreach_norm(grads)).float().sum() if grads else torch.zeros(())
            if loss is not None:  # NaN / inf in the loss stays NaN: one check, one sync
                total = total + loss.detach().float().sum() * 0.0
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
        device = self.param_groups[0]["params"][0].device
        flag = backend.world.sum_(torch.tensor([0.0 if finite else 1.0], device=device))
        return float(flag.item()) == 0.0

    def skip_step(
        self, params: list[Tensor], stats: StepStats, backend: Backend, base_step: Callable[[], Any], where: str
    ) -> StepStats:
        """A counted step that changes nothing (the base step runs without gradients); warned once."""
        self.skipped_steps += 1
        stats.skipped = True
        if not self._warned:
            warnings.warn(
                f"delta-SAM skipped a step: non-finite loss or gradient in {where}. The weights were left "
                "unchanged; skipped steps are counted in 'deltasam/skipped_steps' (warned once).",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned = True
        backend.skip(params, base_step)
        self.rule.discard()
        self.steps += 1
        clear_grads(params)
        return stats


class LayerHooks:
    """Hooks over a model's layers (the Gram capture, the per-instance route), built once per module and parameter
    set by ``build(module, params)`` and reused while neither changes."""

    def __init__(self, build: Callable[[nn.Module, list[Tensor]], Any]) -> None:
        self.build = build
        self._cached: tuple[tuple[int, ...], Any] | None = None

    def get(self, module: nn.Module | None, params: list[Tensor], option: str) -> Any:
        if module is None:
            raise ValueError(
                f"{option} hooks the model's layers: pass the model (DeltaSAM(..., module=model)); "
                "DeltaSAMMixin and DeltaSAMCallback pass it themselves."
            )
        key = (id(module), *(id(p) for p in params))
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self.build(module, params))
        return self._cached[1]
