"""``DeltaSAMMixin``: SAM / delta-SAM for LightningModules you own, through manual optimization."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor

from .config import CLIP_ALGORITHMS, SAMConfig
from .engine import SAMEngine, StepStats
from .head_probe import probe_plan
from .lightning_backend import LightningBackend

_CHECKPOINT_KEY = "deltasam"


class DeltaSAMMixin:
    """Put before ``LightningModule`` in the bases and define ``per_sample_loss(batch) -> Tensor[B]``.

    Keyword options of ``__init__`` are :class:`~lightning_deltasam.config.SAMConfig`'s plus
    ``gradient_clip_val`` / ``gradient_clip_algorithm`` and ``accumulate_grad_batches`` (manual
    optimization refuses the Trainer's): with k > 1 every micro-batch gets its own perturbation,
    the descent gradients are averaged, and the optimizer steps once per k micro-batches (and at
    the end of an epoch). The mixin turns on manual optimization, wraps whatever ``configure_optimizers``
    returns, steps LR schedulers per their interval, and logs ``train/loss`` and ``deltasam/*``.
    With ``probe_scope="head"`` the module also defines the split of
    :mod:`lightning_deltasam.head_probe`. A ``training_step`` override must call :meth:`deltasam_step`; overrides of
    ``on_save_checkpoint`` / ``on_load_checkpoint`` must call ``super()``.
    """

    def __init__(
        self,
        *args: Any,
        gradient_clip_val: Optional[float] = None,
        gradient_clip_algorithm: str = "norm",
        accumulate_grad_batches: int = 1,
        **kwargs: Any,
    ) -> None:
        config, rest = SAMConfig.split(kwargs)
        super().__init__(*args, **rest)
        if gradient_clip_val is not None and (isinstance(gradient_clip_val, bool) or not gradient_clip_val >= 0):
            raise ValueError(f"gradient_clip_val={gradient_clip_val!r} must be >= 0 or None (no clipping).")
        if gradient_clip_algorithm not in CLIP_ALGORITHMS:
            raise ValueError(f"gradient_clip_algorithm={gradient_clip_algorithm!r} is not supported; use 'norm' or 'value'.")
        if isinstance(accumulate_grad_batches, bool) or not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches={accumulate_grad_batches!r} must be an integer >= 1.")
        self.accumulate_grad_batches = accumulate_grad_batches
        self._deltasam_micro_batches = 0
        self.deltasam_config = config
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.automatic_optimization = False
        self._deltasam_engine: Optional[SAMEngine] = None
        self._deltasam_pending_state: Optional[dict[str, Any]] = None
        self._deltasam_optimizer_steps = 0
        self.deltasam_last_stats: Optional[StepStats] = None

    # ------------------------------------------------------------ user API
    def per_sample_loss(self, batch: Any) -> Tensor:
        """Per-instance losses of ``batch``, shape [B] (e.g. ``F.cross_entropy(..., reduction='none')``)."""
        raise NotImplementedError(f"{type(self).__name__} must define per_sample_loss(batch) returning a [B] tensor of losses.")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.deltasam_step(batch)

    def deltasam_step(self, batch: Any) -> Tensor:
        """One SAM / delta-SAM step on ``batch``: both passes, the optimizer and the schedulers; returns the loss at w."""
        optimizer = self.optimizers()
        if isinstance(optimizer, list):
            raise ValueError(f"DeltaSAMMixin supports one optimizer; configure_optimizers returned {len(optimizer)}.")
        engine = self._engine_for(optimizer.optimizer)
        backend = LightningBackend(self.trainer, self.deltasam_config, self.manual_backward, lambda: list(self.buffers()))

        def base_step() -> None:
            engine.clip_gradients(self.gradient_clip_val, self.gradient_clip_algorithm, backend.loss_scale())
            optimizer.step()

        try:
            batch_size: Optional[int] = extract_batch_size(batch)
        except Exception:  # a batch Lightning cannot size: the length check is left to the shape check
            batch_size = None
        engine.accumulate_grad_batches = self.accumulate_grad_batches
        self._deltasam_micro_batches += 1
        window_end = self._deltasam_micro_batches % self.accumulate_grad_batches == 0 or bool(self.trainer.is_last_batch)
        if window_end:
            self._deltasam_micro_batches = 0
        forward, head = probe_plan(self, batch, self.deltasam_config.probe_scope if self.deltasam_config.uses_probes else "all")
        try:
            stats = engine.step(forward, backend, base_step, batch_size=batch_size, head=head, window_end=window_end,
                                source=f"{type(self).__name__}.per_sample_loss")
        finally:
            if head is not None:
                head.clear()
        self.deltasam_last_stats = stats
        if window_end:
            self._deltasam_optimizer_steps += 1
            self._step_schedulers("step")
        self.log("train/loss", stats.loss, prog_bar=True, batch_size=batch_size)
        self.log_dict(stats.as_log_dict(engine.skipped_steps), batch_size=batch_size)
        return stats.loss

    # ------------------------------------------------------------ internals
    def _engine_for(self, optimizer: torch.optim.Optimizer) -> SAMEngine:
        engine = self._deltasam_engine
        if engine is None or engine.param_groups is not optimizer.param_groups:
            engine = SAMEngine(optimizer.param_groups, self.deltasam_config)
            if self._deltasam_pending_state is not None:
                engine.load_state_dict(self._deltasam_pending_state)
                self._deltasam_pending_state = None
            self._deltasam_engine = engine
        return engine

    def _step_schedulers(self, interval: str) -> None:
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            count = self._deltasam_optimizer_steps if interval == "step" else self.current_epoch + 1
            if count % config.frequency:
                continue
            if config.reduce_on_plateau:
                metric = self.trainer.callback_metrics.get(config.monitor) if config.monitor else None
                if metric is None:
                    raise ValueError(
                        f"ReduceLROnPlateau monitors {config.monitor!r}, which was not logged; "
                        f"log it or set 'monitor' in configure_optimizers."
                    )
                config.scheduler.step(metric)
            else:
                config.scheduler.step()

    def on_train_epoch_end(self) -> None:
        self._step_schedulers("epoch")
        super().on_train_epoch_end()  # type: ignore[misc]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = self._deltasam_engine.state_dict() if self._deltasam_engine is not None else self._deltasam_pending_state
        checkpoint[_CHECKPOINT_KEY] = {"engine": state, "optimizer_steps": self._deltasam_optimizer_steps}
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(_CHECKPOINT_KEY)
        if saved is not None:
            self._deltasam_optimizer_steps = int(saved.get("optimizer_steps", 0))
            if saved.get("engine") is not None:
                if self._deltasam_engine is not None:
                    self._deltasam_engine.load_state_dict(saved["engine"])
                else:
                    self._deltasam_pending_state = saved["engine"]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
