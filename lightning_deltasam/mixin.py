"""``DeltaSAMMixin``: SAM / delta-SAM for LightningModules you own, through manual optimization."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor

from .accumulation import MicroBatchBackend, Window
from .batch_rows import select_rows
from .config import SAMConfig
from .lightning_backend import EngineSlot, LightningBackend, batch_size_of, check_strategy, log_stats, module_step
from .options import check_choice, check_int, check_number
from .stats import StepStats

ClipAlgorithm = Literal["norm", "value"]

_CHECKPOINT_KEY = "deltasam"

if TYPE_CHECKING:  # the type checker sees the LightningModule the mixin is combined with; at run time: object
    from lightning.pytorch import LightningModule as _MixinBase
else:
    _MixinBase = object


class DeltaSAMMixin(_MixinBase):
    """Put before ``LightningModule`` in the bases and define ``per_sample_loss(batch) -> Tensor[B]``.

    ``__init__`` takes ``sam`` (a :class:`~lightning_deltasam.config.SAMConfig`; default SAM at rho = 0.05),
    ``gradient_clip_val`` / ``gradient_clip_algorithm`` and ``accumulate_grad_batches`` (manual
    optimization refuses the Trainer's): with k > 1 every micro-batch gets its own perturbation,
    the descent gradients are averaged, and the optimizer steps once per k micro-batches (and at
    the end of an epoch). The mixin turns on manual optimization, wraps whatever ``configure_optimizers``
    returns, steps LR schedulers per their interval, and logs ``train/loss`` and ``deltasam/*``.
    With ``probe_scope="head"`` the module also defines the split of
    :mod:`lightning_deltasam.probing`. A ``training_step`` override must call :meth:`deltasam_step`; overrides of
    ``on_save_checkpoint`` / ``on_load_checkpoint`` must call ``super()``.
    """

    def __init__(
        self,
        *args: Any,
        sam: SAMConfig | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: ClipAlgorithm = "norm",
        accumulate_grad_batches: int = 1,
        **kwargs: Any,
    ) -> None:
        config = sam if sam is not None else SAMConfig()
        if not isinstance(config, SAMConfig):
            raise TypeError(f"sam={sam!r} must be a SAMConfig, e.g. super().__init__(sam=SAMConfig(rho=0.05)).")
        super().__init__(*args, **kwargs)
        if gradient_clip_val is not None:
            check_number("gradient_clip_val", gradient_clip_val, minimum=0.0, hint=" Use None for no clipping.")
        check_choice("gradient_clip_algorithm", gradient_clip_algorithm, get_args(ClipAlgorithm))
        check_int("accumulate_grad_batches", accumulate_grad_batches, minimum=1)
        if accumulate_grad_batches > 1 and config.variant.counts_steps():
            raise ValueError(
                f"variant={config.variant.describe()} with accumulate_grad_batches={accumulate_grad_batches}: the rule "
                "counts and updates once per optimizer step, not per micro-batch. Use accumulate_grad_batches=1 with "
                "it, or SAMOptions() (interval=1)."
            )
        self.accumulate_grad_batches = accumulate_grad_batches
        self.deltasam_config = config
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.automatic_optimization = False
        self._deltasam_slot = EngineSlot(config)
        self._deltasam_window = Window()
        self._deltasam_optimizer_steps = 0
        self.deltasam_last_stats: StepStats | None = None

    @property
    def _deltasam_engine(self) -> Any:
        return self._deltasam_slot.engine

    # ------------------------------------------------------------ user API
    def per_sample_loss(self, batch: Any) -> Tensor | tuple[Tensor, Tensor]:
        """Per-instance losses of ``batch``, shape [B] (e.g. ``F.cross_entropy(..., reduction='none')``); with
        MESA the pair (losses, outputs [B, C])."""
        raise NotImplementedError(
            f"{type(self).__name__} must define per_sample_loss(batch) returning a [B] tensor of losses."
        )

    def select_instances(self, batch: Any, instances: Tensor) -> Any:
        """The batch of the given instances (ESAM's second pass): each tensor with B rows indexed along dim 0."""
        size = batch_size_of(batch)
        if size is None:
            raise ValueError("select_instances: the batch size cannot be read from the batch; override it.")
        return select_rows(batch, instances, size)

    @torch.compiler.disable
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.deltasam_step(batch)

    @torch.compiler.disable
    def deltasam_step(self, batch: Any) -> Tensor:
        """One SAM / delta-SAM step on ``batch``: both passes, the optimizer and the schedulers; returns the loss at w.

        Under ``trainer.fit(torch.compile(module))`` the step itself runs eagerly (it steps an optimizer, logs and
        syncs, which torch.compile cannot trace) and ``per_sample_loss`` is compiled instead: the forward and
        backward of every pass run compiled."""
        self._deltasam_compile()
        optimizer = self.optimizers()
        if isinstance(optimizer, list):
            raise ValueError(f"DeltaSAMMixin supports one optimizer; configure_optimizers returned {len(optimizer)}.")
        if self._deltasam_slot.engine is None:  # the first step: refuse a strategy the step cannot be right under
            check_strategy(self.trainer, self.deltasam_config, "DeltaSAMMixin")
        engine = self._deltasam_slot.for_optimizer(optimizer.optimizer, self)
        backend = LightningBackend(
            self.trainer, self.deltasam_config, self.manual_backward, lambda: list(self.buffers())
        )

        def clipped_step() -> None:
            _clip(engine.params(), self.gradient_clip_val, self.gradient_clip_algorithm, backend.loss_scale())
            optimizer.step()

        window = self._deltasam_window
        window_end = window.count_micro_batch(self.accumulate_grad_batches, bool(self.trainer.is_last_batch))
        if self.accumulate_grad_batches == 1:
            stats = module_step(engine, self, batch, backend, clipped_step)
        else:  # one perturbed micro-batch; the optimizer steps at the window's end
            micro = MicroBatchBackend(
                self.trainer, self.deltasam_config, self.manual_backward, lambda: list(self.buffers())
            )
            micro.window = window
            stats = module_step(engine, self, batch, micro, lambda: window.add(engine.params()))
            if window_end and window.close(engine.params(), backend, clipped_step):
                stats.skipped = True
        self.deltasam_last_stats = stats
        if window_end:
            self._deltasam_optimizer_steps += 1
            self._step_schedulers("step")
        log_stats(self, stats, engine, batch, "train/loss", prog_bar=True)
        assert stats.loss is not None  # a per-instance step always measures the loss at w
        return stats.loss

    # ------------------------------------------------------------ internals
    def _deltasam_compile(self) -> None:
        """Compile ``per_sample_loss`` (and the head split's forward) with the compiler Lightning took from
        ``torch.compile(module)``, once; nothing when the module was not compiled."""
        ctx = getattr(self, "_compiler_ctx", None)
        if not ctx or "per_sample_loss" in self.__dict__:
            return
        for name in ("per_sample_loss", "per_sample_features"):
            method = getattr(self, name, None)
            if callable(method):
                setattr(self, name, ctx["dynamo_ctx"](method))

    def _step_schedulers(self, interval: str) -> None:
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            count = self._deltasam_optimizer_steps if interval == "step" else self.current_epoch + 1
            if count % config.frequency:
                continue
            scheduler: Any = config.scheduler  # an LRScheduler or ReduceLROnPlateau: their step() differs
            if config.reduce_on_plateau:
                metric = self.trainer.callback_metrics.get(config.monitor) if config.monitor else None
                if metric is None:
                    raise ValueError(
                        f"ReduceLROnPlateau monitors {config.monitor!r}, which was not logged; "
                        f"log it or set 'monitor' in configure_optimizers."
                    )
                scheduler.step(metric)
            else:
                scheduler.step()

    def on_train_epoch_end(self) -> None:
        self._step_schedulers("epoch")
        super().on_train_epoch_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CHECKPOINT_KEY] = {
            "engine": self._deltasam_slot.state_dict(),
            "optimizer_steps": self._deltasam_optimizer_steps,
        }
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(_CHECKPOINT_KEY)
        if saved is not None:
            self._deltasam_optimizer_steps = int(saved.get("optimizer_steps", 0))
            if saved.get("engine") is not None:
                self._deltasam_slot.load_state_dict(saved["engine"])
        super().on_load_checkpoint(checkpoint)


def _clip(params: list[Tensor], value: float | None, algorithm: str, loss_scale: float = 1.0) -> None:
    """Clip the descent gradient by norm or by value; thresholds follow a loss scale (scaled grads)."""
    if value is None or value <= 0:
        return
    grads_params = [p for p in params if p.grad is not None]
    if algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(grads_params, value * loss_scale, foreach=True)
    else:
        torch.nn.utils.clip_grad_value_(grads_params, value * loss_scale, foreach=True)
