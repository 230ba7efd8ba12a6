"""``DeltaSAMCallback``: SAM / delta-SAM for unmodified automatic-optimization LightningModules."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from .config import SAMConfig
from .lightning_backend import EngineSlot, LightningBackend, check_strategy, grad_scaler, log_stats, module_step
from .lightning_closure import lightning_closure_parts, muted_logging, refuse_accumulation, require_loss
from .probing import has_split, probe_plan
from .stats import StepStats


class _SkipBatch(Exception):
    """training_step returned None at w: Lightning skips the batch, and so does the step."""


class DeltaSAMCallback(Callback):
    r"""Runs every optimizer step of the Trainer as a SAM / delta-SAM step.

    SAM works with any module: Lightning's closure runs at w (what ``training_step`` logs then
    stands) and again at w + eps (logging muted, hooks and gradient clipping applied to the
    descent gradient only). delta-SAM and ``m`` need ``per_sample_loss(batch)`` on the module: the
    first pass is computed from it and ``training_step`` runs once, at w + eps, so its
    logged loss is the perturbed one; the loss at w is logged as ``deltasam/loss``.
    Refused at fit start: manual optimization (use :class:`DeltaSAMMixin`), ``16-mixed``
    (its plugin steps without the closure), ``accumulate_grad_batches > 1`` (or a ``GradientAccumulationScheduler``
    that sets it; set during the fit, it is refused at its first batch), more than one optimizer.

    Args:
        sam: the step's options (:class:`~lightning_deltasam.config.SAMConfig`); default SAM at rho = 0.05.
    """

    def __init__(self, sam: SAMConfig | None = None) -> None:
        self.config = sam if sam is not None else SAMConfig()
        if not isinstance(self.config, SAMConfig):
            raise TypeError(f"sam={sam!r} must be a SAMConfig, e.g. DeltaSAMCallback(SAMConfig(rho=0.05)).")
        if self.config.variant.needs_outputs or self.config.variant.selects_instances:
            what = (
                "adds a term from the model's outputs to" if self.config.variant.needs_outputs else "selects rows for"
            )
            raise ValueError(
                f"DeltaSAMCallback(variant={self.config.variant.name!r}): the variant {what} the loss, and the "
                "callback runs your training_step on the whole batch as it is. Use DeltaSAMMixin (per_sample_loss) "
                "or DeltaSAM (its closure)."
            )
        self._slot = EngineSlot(self.config)
        self._restore: list[Callable[[], None]] = []
        self._batch: Any = None
        self.last_stats: StepStats | None = None

    @property
    def _per_sample(self) -> bool:
        """Whether the first pass needs the module's ``per_sample_loss`` (delta-SAM, or the per-instance route)."""
        return self.config.reweighting or self.config.per_instance

    # ---------------------------------------------------------------- checks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(pl_module).__name__
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"DeltaSAMCallback needs automatic optimization, but {name} sets automatic_optimization=False. "
                "For manual optimization use DeltaSAMMixin instead."
            )
        if self.config.step_probe_scope == "head" and not has_split(pl_module):
            probe_plan(pl_module, None, "head")  # raises, naming the methods to define
        if self._per_sample and not callable(getattr(pl_module, "per_sample_loss", None)):
            option = f"m={self.config.m}" if self.config.per_instance else f"reweight={self.config.reweight.name!r}"  # type: ignore[union-attr]
            raise ValueError(
                f"DeltaSAMCallback({option}) needs {name}.per_sample_loss(batch) returning per-instance "
                "losses of shape [B]; define it, or use plain SAM (reweight=None, m=None), which works with any module."
            )
        if grad_scaler(trainer) is not None:
            raise ValueError(
                f"DeltaSAMCallback cannot run with precision={trainer.precision!r}: its GradScaler steps the optimizer "
                "without the closure, so the second pass cannot run. Use precision='bf16-mixed' or '32-true', "
                "or DeltaSAMMixin, which supports '16-mixed'."
            )
        refuse_accumulation(trainer)
        check_strategy(trainer, self.config, "DeltaSAMCallback")

    # ----------------------------------------------------------- wrap / unwrap
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The optimizers exist from here on (the Trainer configures them after ``setup``).
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"DeltaSAMCallback supports one optimizer, but {type(pl_module).__name__}.configure_optimizers returned "
                f"{len(trainer.optimizers)}. Return one optimizer (one param group per part of the model if their "
                "settings differ), or use DeltaSAMMixin / DeltaSAM with manual optimization."
            )
        self._wrap(trainer.optimizers[0], trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap()

    def _unwrap(self) -> None:
        while self._restore:
            self._restore.pop()()

    def _wrap(self, optimizer: Optimizer, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        had_own = "step" in optimizer.__dict__
        original_step = optimizer.step

        # functools.wraps keeps the mark torch's LR schedulers put on the step they wrapped
        # (``_wrapped_by_lr_sched``); without it each scheduler warns that ``optimizer.step()`` was overridden.
        # ``original_step`` is their wrapper, so it still records the call (``optimizer._opt_called``).
        @functools.wraps(original_step)
        def step(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
            if closure is None:
                raise RuntimeError(
                    "DeltaSAMCallback: the optimizer was stepped without a closure, so the second pass cannot run "
                    f"(precision={trainer.precision!r}). Use DeltaSAMMixin for this setup."
                )
            refuse_accumulation(trainer)  # changed within the batch: refused before the update
            return self._step(optimizer, closure, lambda: original_step(**kwargs), trainer, pl_module)

        optimizer.step = step  # type: ignore[method-assign]

        def restore() -> None:
            if had_own:
                optimizer.step = original_step  # type: ignore[method-assign]
            else:
                optimizer.__dict__.pop("step", None)

        self._restore.append(restore)

    # ------------------------------------------------------------------ step
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # accumulate_grad_batches may change during the fit (GradientAccumulationScheduler or any hook sets it
        # at epoch start): refused at the first batch it applies to, before its forward pass
        refuse_accumulation(trainer)
        self._batch = batch
        self.last_stats = None

    def _step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        base_step: Callable[[], Any],
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
    ) -> Any:
        inner, get_result, set_result = lightning_closure_parts(closure)
        first: dict[str, Any] = {}

        def first_pass() -> Tensor:
            loss = inner()
            if loss is None:
                raise _SkipBatch
            first["result"] = get_result()
            return loss

        def second_pass() -> Tensor:
            if not first:
                return require_loss(closure())
            with muted_logging(pl_module):
                loss = closure()
            if first["result"] is not None:
                set_result(first["result"])  # report the loss at w, as training_step logged it
            return require_loss(loss)

        backend = LightningBackend(
            trainer,
            self.config,
            backward_fn=lambda loss: trainer.strategy.backward(loss, optimizer),
            buffers=lambda: list(pl_module.buffers()),
            forward_context=trainer.precision_plugin.train_step_context,
        )
        try:
            stats = module_step(
                self._slot.for_optimizer(optimizer, pl_module),
                pl_module,
                self._batch,
                backend,
                base_step,
                per_sample=self._per_sample,
                first_pass=first_pass,
                second_pass=second_pass,
            )
        except _SkipBatch:
            return None
        self.last_stats = stats
        return stats.loss

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.last_stats is not None and self._slot.engine is not None:
            log_stats(pl_module, self.last_stats, self._slot.engine, batch, "deltasam/loss")

    # ------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return dict(self._slot.state_dict() or {})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._slot.load_state_dict(state_dict)
