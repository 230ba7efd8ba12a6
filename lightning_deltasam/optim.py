"""``DeltaSAM``: SAM / delta-SAM as a plain ``torch.optim`` optimizer wrapping any base optimizer."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .config import SAMConfig
from .engine import SAMEngine
from .parts import Backend, StepStats, check_per_sample_losses, make_backend


def _arguments(factory: Callable[..., Any]) -> set[str]:
    """The keyword names ``factory`` accepts (empty when its signature cannot be read)."""
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


class DeltaSAM(Optimizer):
    """SAM (``reweight=None``) or delta-SAM (``reweight="delta"``) around a base optimizer.

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
    (BatchNorm) are updated by the first pass only (and, for ``estimator="exact"``/``"sketch"``, so its
    layers can be hooked). Every keyword that is not a SAM option goes to the
    base optimizer; ``base_kwargs`` go to it whatever their names (a base argument named like a SAM option,
    e.g. RMSprop's ``alpha`` or Adadelta's ``rho``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | Callable[..., Optimizer],
        *,
        module: nn.Module | None = None,
        base_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not callable(base_optimizer):
            raise TypeError(f"base_optimizer={base_optimizer!r} must be an optimizer class such as torch.optim.AdamW.")
        try:
            config, rest = SAMConfig.split(kwargs)
        except ValueError as err:
            shared = sorted(set(kwargs) & set(SAMConfig.option_names()) & _arguments(base_optimizer))
            if not shared:
                raise
            name = getattr(base_optimizer, "__name__", repr(base_optimizer))
            raise ValueError(
                f"{err} ({', '.join(shared)} is also an argument of {name}: to give it to {name}, pass "
                f"base_kwargs={{{shared[0]!r}: ...}}.)"
            ) from err
        base_kwargs = {**rest, **(base_kwargs or {})}
        if config.step_probe_scope == "head":
            raise ValueError(
                "probe_scope='head' is for modules that split their loss (DeltaSAMMixin, DeltaSAMCallback); "
                "DeltaSAM's closure returns losses only: use probe_scope='all'."
            )
        if config.uses_gram and module is None:
            raise ValueError(
                f"estimator={config.estimator!r} forms per-instance gradients from the model's layers: "
                "pass the model, DeltaSAM(params, base_optimizer, module=model, ...)."
            )
        if config.per_instance and module is None:
            raise ValueError(
                f"m={config.m} gives each group of instances its own perturbation through the model's layers: "
                "pass the model, DeltaSAM(params, base_optimizer, module=model, m=...)."
            )
        super().__init__(params, dict(base_kwargs))
        self.base_optimizer: Optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = self.base_optimizer.defaults
        self.state = self.base_optimizer.state
        self.config = config
        self.engine = SAMEngine(self.param_groups, config)
        self._module = module
        self.last_stats: StepStats | None = None
        self._grads_left: dict[
            int, tuple[Any, int]
        ] = {}  # id(param) -> (weakref to the .grad a step left, its version)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SAM / delta-SAM step. Per-instance closure: returns the per-instance losses at w; backward
        closure (a gradient from the caller's backward at w is in ``.grad``): returns the closure's loss."""
        if closure is None:
            raise ValueError(
                "DeltaSAM.step needs closure=...: SAM evaluates the loss at two points. Either a function returning "
                "per-instance losses of shape [B] (the optimizer runs every backward), or, for SAM / ASAM, run "
                "loss.backward() at w first and pass a closure that runs forward and backward and returns the loss; "
                "or call first_step() / second_step() around your own second backward."
            )
        backend = self._backend()
        try:
            if self._has_new_gradient():
                stats, out = self.engine.closure_step(closure, backend, self.base_optimizer.step)
            else:
                with torch.enable_grad():
                    stats = self.engine.step(
                        self._checked(closure),
                        backend,
                        self.base_optimizer.step,
                        source="DeltaSAM closure",
                        module=self._module,
                    )
                assert stats.losses is not None
                out = stats.losses
        finally:
            self._remember_grads()
        self.last_stats = stats
        return out

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """w <- w + eps, eps from the gradient in ``.grad`` (your backward at w); then run your backward at
        w + eps and call :meth:`second_step`. SAM and ASAM only (delta-SAM needs per-instance losses)."""
        self.engine.first_step(self._backend())
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> StepStats:
        """Restore w bit for bit and step the base optimizer on the gradient in ``.grad`` (your backward at
        w + eps); a non-finite gradient skips the step (counted, warned once)."""
        try:
            self.last_stats = self.engine.second_step(self._backend(), self.base_optimizer.step)
        finally:
            self._remember_grads()
        if zero_grad:
            self.zero_grad()
        return self.last_stats

    def _backend(self) -> Backend:
        module = self._module
        buffers = (lambda: list(module.buffers())) if module is not None else None
        return make_backend(self.config, buffers)

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

    def _has_new_gradient(self) -> bool:
        """Whether a backward ran since this optimizer's last step: a ``.grad`` that is not the one the last step
        left there, or was changed since (zero_grad(set_to_none=False) then backward)."""
        new = False
        for p in self.engine.params():
            g = p.grad
            if g is None:
                continue
            left = self._grads_left.get(id(p))
            if left is None or left[0]() is not g or left[1] != g._version:
                new = True
                break
        if new and self.config.reweighting:
            raise ValueError(
                "reweight='delta' needs per-instance losses: the gradients in .grad come from a backward before "
                "step(closure) (the davda54/sam backward-closure contract, SAM / ASAM only). For delta-SAM call "
                "zero_grad() and pass a closure returning the per-instance losses, shape [B]; the optimizer runs every backward."
            )
        return new

    def _remember_grads(self) -> None:
        self._grads_left = {
            id(p): (weakref.ref(p.grad), p.grad._version) for p in self.engine.params() if p.grad is not None
        }

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

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
