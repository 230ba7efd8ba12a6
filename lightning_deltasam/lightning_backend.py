"""What the two Lightning adapters (mixin, callback) share: the core's :class:`~.backend.Backend` for a Trainer
(its strategy and precision), the engine with its checkpoint state, one step on a module's batch, and the logging."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn
from torch.optim import Optimizer

from .backend import Backend
from .config import SAMConfig
from .distributed import default_reducer
from .engine import SAMEngine
from .passes import Passes
from .probing import probe_plan
from .stats import StepStats


def grad_scaler(trainer: pl.Trainer) -> Any | None:
    """The precision plugin's GradScaler (``16-mixed``), else None."""
    return getattr(trainer.precision_plugin, "scaler", None)


class LightningBackend(Backend):
    """Backward through ``backward_fn`` (``manual_backward`` or the strategy's), DDP's no_sync from the strategy."""

    def __init__(
        self,
        trainer: pl.Trainer,
        config: SAMConfig,
        backward_fn: Callable[[Tensor], Any],
        buffers: Callable[[], list[Tensor]],
        forward_context: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        super().__init__(default_reducer(config.sync), buffers, world=default_reducer("global"))
        self.trainer = trainer
        self._backward = backward_fn
        self._forward_context = forward_context

    def backward(self, loss: Tensor) -> None:
        self._backward(loss)

    def no_sync(self) -> AbstractContextManager:
        strategy = self.trainer.strategy
        return strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else nullcontext()

    def forward_context(self) -> AbstractContextManager:
        return self._forward_context() if self._forward_context is not None else nullcontext()

    def loss_scale(self) -> float:
        scaler = grad_scaler(self.trainer)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def skip(self, params: list[Tensor], base_step: Callable[[], Any]) -> None:
        if grad_scaler(self.trainer) is None:
            return super().skip(params, base_step)
        # A GradScaler must see a non-finite gradient to skip the step and back off its scale.
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            grads = [params[0].new_zeros(params[0].shape)]
            params[0].grad = grads[0]
        if all(bool(g.isfinite().all()) for g in grads):
            grads[0].view(-1)[0] = float("nan")
        base_step()


def check_strategy(trainer: pl.Trainer, config: SAMConfig, adapter: str) -> None:
    """Refuse, before the first step, a strategy the step cannot be right under, naming what works instead:
    DeepSpeed always; under FSDP (``strategy="fsdp"``, ``ModelParallelStrategy``) what needs whole weights."""
    strategy = type(trainer.strategy).__name__
    if "DeepSpeed" in strategy:
        raise ValueError(
            f"{adapter} cannot run under {strategy}: DeepSpeed partitions the parameters (ZeRO) and steps the "
            "optimizer itself, without the closure SAM's second pass needs. Use strategy='ddp', strategy='fsdp' "
            "(FSDP1) or ModelParallelStrategy with configure_model (FSDP2)."
        )
    if strategy not in ("FSDPStrategy", "ModelParallelStrategy"):
        return
    refused = config.sharding_refusal()
    if refused is not None:
        raise ValueError(f"{adapter} under {strategy} (sharded parameters): {refused[0]}. {refused[1]}.")


# ------------------------------------------------------------- glue shared by the mixin and the callback
class EngineSlot:
    """The adapter's :class:`SAMEngine`, created on the first step; checkpoint state may arrive before it exists."""

    def __init__(self, config: SAMConfig) -> None:
        self.config = config
        self.engine: SAMEngine | None = None
        self._pending: dict[str, Any] | None = None

    def for_optimizer(self, optimizer: Optimizer, module: nn.Module) -> SAMEngine:
        """The engine over ``optimizer``'s parameter groups (a new one if the optimizer changed), its checkpointed
        state keyed by ``module``'s parameter names."""
        if self.engine is None or self.engine.param_groups is not optimizer.param_groups:
            self.engine = SAMEngine(optimizer.param_groups, self.config, base_state=lambda: optimizer.state)
            self.engine.name_parameters(module)
            if self._pending is not None:
                self.engine.load_state_dict(self._pending)
                self._pending = None
        return self.engine

    def state_dict(self) -> dict[str, Any] | None:
        return self.engine.state_dict() if self.engine is not None else self._pending

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.engine is not None:
            self.engine.load_state_dict(state)
        else:
            self._pending = dict(state)


def batch_size_of(batch: Any) -> int | None:
    """Lightning's batch size of ``batch``, None when it cannot tell (the loss shape check then does without)."""
    try:
        return extract_batch_size(batch)
    except Exception:
        return None


def module_step(
    engine: SAMEngine,
    module: pl.LightningModule,
    batch: Any,
    backend: Backend,
    base_step: Callable[[], Any],
    *,
    per_sample: bool = True,
    **passes: Any,
) -> StepStats:
    """``engine.step`` on one batch of a LightningModule: its ``per_sample_loss`` (or head split) as the forward.

    ``per_sample=False`` runs without the module's per-instance losses (the callback's plain SAM);
    ``passes`` are the engine's ``first_pass`` / ``second_pass``.
    """
    forward, head = probe_plan(module, batch, engine.config.step_probe_scope) if per_sample else (None, None)
    size, select = batch_size_of(batch), None
    if engine.config.variant.selects_instances:  # ESAM: the second pass on chosen rows of the batch
        select = lambda rows: module.per_sample_loss(module.select_instances(batch, rows))  # type: ignore[operator] # noqa: E731
    try:
        source = f"{type(module).__name__}.per_sample_loss"
        return engine.step(
            Passes(forward, backend, batch_size=size, module=module, head=head, source=source, select=select, **passes),
            base_step,
        )
    finally:
        if head is not None:
            head.clear()


def log_stats(
    module: pl.LightningModule, stats: StepStats, engine: SAMEngine, batch: Any, loss_key: str, prog_bar: bool = False
) -> None:
    """Log the loss at w as ``loss_key`` and the step's ``deltasam/*`` diagnostics."""
    batch_size = batch_size_of(batch)
    if stats.loss is not None:  # None only in the two-step API, which no Lightning adapter uses
        module.log(loss_key, stats.loss, prog_bar=prog_bar, batch_size=batch_size)
    module.log_dict(stats.as_log_dict(engine.skipped_steps), batch_size=batch_size)
