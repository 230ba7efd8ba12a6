"""``DeltaSAM``: SAM / delta-SAM as a plain ``torch.optim`` optimizer wrapping any base optimizer."""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook
from torch.optim import Optimizer

from .backend import Backend, make_backend
from .config import SAMConfig
from .distributed import local_tensor
from .engine import SAMEngine
from .passes import Passes, check_per_sample_losses
from .restore import clear_grads
from .stats import StepStats


def _arguments(factory: Callable[..., Any]) -> set[str]:
    """The keyword names ``factory`` accepts (empty when its signature cannot be read)."""
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


class DeltaSAM(Optimizer):
    """The SAM-family step of ``sam`` (a :class:`~lightning_deltasam.config.SAMConfig`; default SAM at rho = 0.05)
    around a base optimizer: ``DeltaSAM(params, torch.optim.AdamW, SAMConfig(rho=0.05), lr=1e-3)``.

    ``step(closure)`` takes either closure contract:

    - per-instance (every method, the only one for delta-SAM): with no gradient from a backward since
      the last step, the optimizer runs every forward and backward itself; ``closure()`` returns the
      per-instance losses, shape [B], with grad enabled. ``step`` returns them at the unperturbed w.
    - backward closure (SAM and ASAM, as davda54/sam and pytorch_optimizer): the caller has run
      ``loss.backward()`` at w before ``step(closure)``; ``closure()`` runs forward and backward
      itself and returns the loss. ``step`` returns the closure's loss (at w + eps).

    ``first_step(zero_grad)`` / ``second_step(zero_grad)`` are the peers' two-step calls (SAM and ASAM):
    first_step perturbs w along the gradient in ``.grad``, second_step restores w bit for bit and
    steps. Parameter groups may set their own ``rho``, ``adaptive`` and ``eta`` (a rho schedule writes
    ``group["rho"]``). All of it runs the one :class:`SAMEngine`. ``param_groups`` and ``state`` are
    the base optimizer's, so LR schedulers work unchanged. Pass ``module=`` so running statistics
    (BatchNorm) are updated by the first pass only (and, for ``m`` and ``GramWeights``, so its layers can be
    hooked, and so the rule's checkpointed state is keyed by parameter name). Pass ``grad_scaler=`` (a ``torch.amp.GradScaler``) to train under one:
    both passes are unscaled and either pass's overflow lowers the scale (docs: Distributed and sharded
    training, for the recipes). Under FSDP2 / FSDP1 the step works on each rank's shards, with norms
    over all of them. The keywords (and ``base_kwargs``) go to the base optimizer; one named like a SAM option
    that the base optimizer does not take is refused, naming SAMConfig.
    """

    # torch's protocol for optimizers that handle a GradScaler's scale themselves: ``scaler.step(opt, ...)`` calls
    # step() directly (setting ``grad_scale`` / ``found_inf`` on it) instead of unscaling only the first gradient
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | Callable[..., Optimizer],
        sam: SAMConfig | None = None,
        *,
        module: nn.Module | None = None,
        base_kwargs: dict[str, Any] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        **kwargs: Any,
    ) -> None:
        if not callable(base_optimizer):
            raise TypeError(f"base_optimizer={base_optimizer!r} must be an optimizer class such as torch.optim.AdamW.")
        config = sam if sam is not None else SAMConfig()
        if not isinstance(config, SAMConfig):
            raise TypeError(f"sam={config!r} must be a SAMConfig, e.g. DeltaSAM(params, AdamW, SAMConfig(rho=0.05)).")
        _refuse_sam_keywords(kwargs, base_optimizer)
        base_kwargs = {**kwargs, **(base_kwargs or {})}
        _check_module_options(config, module, grad_scaler)
        super().__init__(params, dict(base_kwargs))
        self.base_optimizer: Optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = self.base_optimizer.defaults
        self.state = self.base_optimizer.state
        self.config = config
        self.engine = SAMEngine(self.param_groups, config)
        self.engine.name_parameters(module)
        self._module = module
        self.grad_scaler = grad_scaler
        self.last_stats: StepStats | None = None
        self._norm_checked = module is not None  # without module=, the first step looks for BatchNorm (warned once)
        self._warned_accumulated = False
        # id(param) -> (weakref to the .grad a step left, its version, whether zero_grad zeroed it in place)
        self._grads_left: dict[int, tuple[Any, int, bool]] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SAM / delta-SAM step. Per-instance closure: returns the per-instance losses at w; backward
        closure (a gradient from the caller's backward at w is in ``.grad``): returns the closure's loss.
        Without a closure after :meth:`first_step`, it is :meth:`second_step` (so ``scaler.step(optimizer)``
        can finish a two-step SAM step under a GradScaler); it then returns None."""
        scaled = self._scaler_call(closure)
        if closure is None:
            if self.engine._pending is not None:
                self._second_step(scaled)
                return None
            raise ValueError(
                "DeltaSAM.step needs closure=...: SAM evaluates the loss at two points. Either a function returning "
                "per-instance losses of shape [B] (the optimizer runs every backward), or, for SAM / ASAM, run "
                "loss.backward() at w first and pass a closure that runs forward and backward and returns the loss; "
                "or call first_step() / second_step() around your own second backward."
            )
        backend = self._backend(scaled)
        new_gradient = self._has_new_gradient()  # a refusal here changed nothing: the gradient stays the caller's
        try:
            with self._norm_check():
                if new_gradient:
                    stats, out = self.engine.closure_step(closure, backend, self.base_optimizer.step)
                else:
                    with torch.enable_grad():
                        passes = Passes(self._checked(closure), backend, source="DeltaSAM closure", module=self._module)
                        stats = self.engine.step(passes, self.base_optimizer.step)
                    assert stats.losses is not None
                    out = stats.losses
        finally:
            self._remember_grads()
        self.last_stats = stats
        return out

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """w <- w + eps, eps from the gradient in ``.grad`` (your backward at w); then run your backward at
        w + eps and call :meth:`second_step` (or ``scaler.step(optimizer)`` under a GradScaler). SAM and ASAM
        and the variants only (delta-SAM needs per-instance losses). The gradient at w is taken: ``.grad`` is
        empty afterwards whatever ``zero_grad`` says (kept for davda54/sam's signature), so the second backward
        never adds to it; a non-finite gradient is left there instead, so a GradScaler's inf check sees it, and
        the step becomes a skip."""
        if self.engine._pending is None:  # (twice in a row: the engine says so)
            self.config.check_two_step()
            if not self._has_new_gradient(two_step=True):
                raise RuntimeError(
                    "first_step() found no gradient from a backward since the last step in .grad (only what the "
                    "last step left, or nothing): run loss.backward() at w first. Nothing was changed."
                )
        self.engine.first_step(self._backend(scaled=True))

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> StepStats:
        """Restore w bit for bit and step the base optimizer on the gradient in ``.grad`` (your backward at
        w + eps); a non-finite gradient skips the step (counted, warned once). With ``grad_scaler``, the gradient
        is unscaled here unless ``scaler.unscale_(optimizer)`` already did."""
        self._second_step(scaled=True)
        if zero_grad:
            self.zero_grad()
        assert self.last_stats is not None
        return self.last_stats

    def _second_step(self, scaled: bool) -> None:
        try:
            self.last_stats = self.engine.second_step(self._backend(scaled), self.base_optimizer.step)
        finally:
            self._remember_grads()

    def _scaler_call(self, closure: Callable[[], Any] | None) -> bool:
        """Inside ``scaler.step(self, ...)`` (torch sets ``grad_scale`` on the optimizer for the call): whether the
        gradient in ``.grad`` is still scaled; refuses what cannot be right, restoring w. Outside: True."""
        if not hasattr(self, "grad_scale"):
            return True
        recipe = (
            "scaler.scale(loss).backward(); scaler.step(optimizer, closure); scaler.update(), the closure calling "
            "scaler.scale(loss).backward() at w + eps; or scaler.scale(loss).backward(); optimizer.first_step(); "
            "scaler.scale(loss2).backward(); scaler.step(optimizer); scaler.update()"
        )
        problem = None
        if self.grad_scaler is None:
            problem = (
                "DeltaSAM was stepped by a GradScaler (scaler.step) but not given it, so its second gradient would "
                "stay scaled and an overflow there would not lower the scale. Pass DeltaSAM(..., grad_scaler=scaler)"
            )
        elif closure is not None and self.grad_scale is None:
            problem = (
                "scaler.unscale_(optimizer) was called before scaler.step(optimizer, closure): the closure's gradient "
                "at w + eps comes after it and cannot be unscaled again. Do not call unscale_ with a closure (clip "
                "in the two-step recipe instead)"
            )
        if problem is not None:
            self.engine.restore_pending()
            raise ValueError(f"{problem}. Recipe: {recipe}.")
        return self.grad_scale is not None

    def _backend(self, scaled: bool = True) -> Backend:
        module = self._module
        buffers = (lambda: list(module.buffers())) if module is not None else None
        backend = make_backend(self.config.sync, buffers)
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return backend
        return ScalerBackend(backend, self.grad_scaler, self, scaled)

    def _checked(self, closure: Callable[[], Any]) -> Callable[[], Tensor]:
        """The per-instance closure, with the error a scalar (backward-closure) return deserves."""

        def per_instance() -> Tensor:
            losses = closure()
            if isinstance(losses, Tensor) and losses.dim() == 0:
                shape = "DeltaSAM closure must return per-instance losses of shape [B]; got shape () (a scalar)"
                if self.config.reweighting:
                    raise ValueError(
                        f"reweight='delta' needs per-instance losses: {shape}. Use reduction='none' and "
                        "leave every backward to the optimizer."
                    )
                raise ValueError(
                    f"{shape}. Either use reduction='none' and leave every backward to the optimizer, or use "
                    "the backward-closure contract of davda54/sam (SAM / ASAM): run loss.backward() before "
                    "step(closure); the closure then runs forward and backward at w + eps."
                )
            return check_per_sample_losses(losses, "DeltaSAM closure")

        return per_instance

    def _has_new_gradient(self, two_step: bool = False) -> bool | None:
        """Whether a backward ran since this optimizer's last step: a ``.grad`` that is not the one the last step
        left there, or was changed since (None for ``two_step`` when no ``.grad`` is there at all). A gradient
        added onto the one the last step left (no zero_grad() before the backward) is warned once."""
        new, any_grad, accumulated = False, False, False
        for p in self.engine.params():
            g = p.grad
            if g is None:
                continue
            any_grad = True
            left = self._grads_left.get(id(p))
            if left is None or left[0]() is not g:
                new = True
            elif left[1] != g._version:  # a backward changed it: onto zeros (zero_grad) or onto the last step's
                new, accumulated = True, accumulated or not left[2]
        if accumulated and not self._warned_accumulated:
            self._warned_accumulated = True
            warnings.warn(
                "DeltaSAM: a backward added its gradient onto the one the last step left in .grad (no zero_grad() "
                "before it), so the step uses their sum. Call optimizer.zero_grad() before each step's first "
                "backward. (If you zeroed .grad in place yourself, call optimizer.zero_grad(set_to_none=False) "
                "instead: it is recognised.) Warned once.",
                RuntimeWarning,
                stacklevel=3,
            )
        if two_step:
            return new if any_grad else None
        if new and (self.config.reweighting or self.config.per_instance):
            option = f"m={self.config.m}" if self.config.per_instance else f"reweight={self.config.reweight.name!r}"  # type: ignore[union-attr]
            raise ValueError(
                f"{option} needs per-instance losses, but .grad holds gradients from a backward before "
                "step(closure) (the davda54/sam backward-closure contract, SAM / ASAM and the variants only). "
                "Call optimizer.zero_grad() before step(closure) and pass a closure returning the per-instance "
                "losses, shape [B]: the optimizer runs every backward. Nothing was changed."
            )
        return new

    def _remember_grads(self, zeroed: bool = False) -> None:
        self._grads_left = {
            id(p): (weakref.ref(p.grad), p.grad._version, zeroed) for p in self.engine.params() if p.grad is not None
        }

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        if not set_to_none:  # zeroed in place: "left", not new, until a backward changes them (then it is new)
            self._remember_grads(zeroed=True)

    @contextmanager
    def _norm_check(self) -> Iterator[None]:
        """Without ``module=``, the first step watches the modules that run: a BatchNorm (or any module with
        running statistics) in training mode is updated by both passes, which ``module=`` prevents; warned once."""
        if self._norm_checked:
            yield
            return
        self._norm_checked = True
        found: list[str] = []

        def watch(module: nn.Module, args: Any, output: Any) -> None:
            if not found and module.training and getattr(module, "running_mean", None) is not None:
                found.append(type(module).__name__)

        handle = register_module_forward_hook(watch)
        try:
            yield
        finally:
            handle.remove()
        if found:
            warnings.warn(
                f"DeltaSAM: the model has a {found[0]} in training mode, and DeltaSAM was not given the model: its "
                "running statistics are updated by both passes (at w and at w + eps). Pass "
                "DeltaSAM(..., module=model) so only the first pass updates them. Warned once.",
                RuntimeWarning,
                stacklevel=4,
            )

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a ``"deltasam"`` entry (probe generator, counters)."""
        state = self.base_optimizer.state_dict()
        state["deltasam"] = self.engine.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        engine_state = state_dict.pop("deltasam", None)
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.engine.param_groups = self.param_groups
        if engine_state is not None:
            self.engine.load_state_dict(engine_state)

    def __repr__(self) -> str:
        return f"DeltaSAM({self.config}, base={self.base_optimizer!r})"


class ScalerBackend(Backend):
    """A GradScaler around the engine's step (``DeltaSAM(..., grad_scaler=scaler)``): the engine's own backwards
    are scaled; the first gradient is divided by the scale before eps is formed; the descent gradient is unscaled
    by ``scaler.unscale_`` (which records its inf check); a skipped step makes the scaler see an overflow, so
    ``scaler.update()`` lowers the scale whichever pass overflowed. ``scaled``: False when the caller already
    called ``scaler.unscale_`` on the descent gradient."""

    def __init__(self, base: Backend, scaler: torch.amp.GradScaler, optimizer: Optimizer, scaled: bool) -> None:
        super().__init__(base.reducer, base._buffers, base.world)
        self.scaler, self.optimizer, self.scaled = scaler, optimizer, scaled
        self._scale: float | None = None

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def loss_scale(self) -> float:
        if self._scale is None:
            self._scale = float(self.scaler.get_scale())
        return self._scale

    def unscale_ascent_(self, grads: list[Tensor]) -> None:
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.loss_scale())

    def unscale_descent_(self) -> None:
        if self.scaled:
            self._record()

    def _record(self) -> None:
        """``scaler.unscale_(optimizer)``: unscales ``.grad`` and records its inf check for ``scaler.update()``;
        nothing if the caller already called it this step (torch refuses a second call)."""
        try:
            self.scaler.unscale_(self.optimizer)
        except RuntimeError as err:
            if "already been called" not in str(err):
                raise

    def skip(self, params: list[Tensor], base_step: Callable[[], Any]) -> None:
        # the scaler lowers its scale only if its inf check sees an overflow: a NaN in one gradient, then the check
        if params[0].grad is None:
            params[0].grad = torch.zeros_like(params[0])
        local_tensor(params[0].grad).view(-1)[:1] = float("nan")
        if self.scaled:
            self._record()
        clear_grads(params)
        base_step()


def _refuse_sam_keywords(kwargs: dict[str, Any], base_optimizer: Callable[..., Any]) -> None:
    """A SAM option given as a keyword (the old flat spelling) is refused, unless the base optimizer takes it."""
    stray = sorted(set(kwargs) & (set(SAMConfig.option_names()) | _VARIANT_WORDS) - _arguments(base_optimizer))
    if stray:
        raise TypeError(
            f"DeltaSAM got {stray[0]}={kwargs[stray[0]]!r}, a SAM option: SAM options go in a SAMConfig, "
            f"DeltaSAM(params, base_optimizer, SAMConfig({stray[0]}=...), lr=...); the keywords are the base optimizer's."
        )


_VARIANT_WORDS = {"estimator", "score", "num_probes", "alpha", "interval", "k", "gamma", "sigma", "lmbda", "min_rho"}


def _check_module_options(config: SAMConfig, module: nn.Module | None, grad_scaler: Any) -> None:
    """The options that need the model (or refuse a GradScaler), refused before anything is built."""
    if config.step_probe_scope == "head":
        raise ValueError(
            "probe_scope='head' is for modules that split their loss (DeltaSAMMixin, DeltaSAMCallback); "
            "DeltaSAM's closure returns losses only: use probe_scope='all'."
        )
    if config.hooks_layers and module is None:
        option = f"m={config.m}" if config.per_instance else f"reweight={config.reweight.name!r}"  # type: ignore[union-attr]
        raise ValueError(
            f"{option} forms per-instance gradients from the model's layers: pass the model, "
            "DeltaSAM(params, base_optimizer, sam, module=model)."
        )
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler={grad_scaler!r} must be a torch.amp.GradScaler (or None).")
    if grad_scaler is not None and config.per_instance:
        raise ValueError(
            f"m={config.m} with grad_scaler: the per-instance route does not unscale its gradients. Use "
            "bf16 autocast (no scaler), or m=None with the GradScaler."
        )
