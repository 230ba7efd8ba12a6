"""``DeltaSAM``: SAM / delta-SAM as a plain ``torch.optim`` optimizer wrapping any base optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .backend import Backend, make_backend
from .closure_contracts import (
    LeftoverGrads,
    batchnorm_watch,
    check_module_options,
    checked_closure,
    refuse_sam_keywords,
    rows_closure,
)
from .config import SAMConfig
from .engine import SAMEngine
from .passes import Passes
from .scaler_backend import ScalerBackend
from .stats import StepStats


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
        refuse_sam_keywords(kwargs, base_optimizer)
        base_kwargs = {**kwargs, **(base_kwargs or {})}
        check_module_options(config, module, grad_scaler)
        super().__init__(params, dict(base_kwargs))
        self.base_optimizer: Optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = self.base_optimizer.defaults
        self.state = self.base_optimizer.state
        self.config = config
        self.engine = SAMEngine(self.param_groups, config, base_state=lambda: self.base_optimizer.state)
        self.engine.name_parameters(module)
        self._module = module
        self.grad_scaler = grad_scaler
        self.last_stats: StepStats | None = None
        self._norm_checked = module is not None  # without module=, the first step looks for BatchNorm (warned once)
        self._leftover = LeftoverGrads(config)  # the .grad a step left: a new backward's is told from it

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
        new_gradient = self._leftover.has_new(
            self.engine.params()
        )  # a refusal here changed nothing: the gradient stays the caller's
        try:
            watch, self._norm_checked = not self._norm_checked, True
            with batchnorm_watch(watch):
                if new_gradient:
                    stats, out = self.engine.closure_step(closure, backend, self.base_optimizer.step)
                else:
                    with torch.enable_grad():
                        passes = Passes(
                            checked_closure(closure, self.config),
                            backend,
                            source="DeltaSAM closure",
                            module=self._module,
                            select=rows_closure(closure, self.config),
                        )
                        stats = self.engine.step(passes, self.base_optimizer.step)
                    assert stats.losses is not None
                    out = stats.losses
        finally:
            self._leftover.remember(self.engine.params())
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
            if not self._leftover.has_new(self.engine.params(), two_step=True):
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
            self._leftover.remember(self.engine.params())

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

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        if not set_to_none:  # zeroed in place: "left", not new, until a backward changes them (then it is new)
            self._leftover.remember(self.engine.params(), zeroed=True)

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
