"""``DeltaSAMMixin``: SAM / delta-SAM for LightningModules you own, through manual optimization."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor

from .config import SAMConfig
from .lightning_backend import EngineSlot, LightningBackend, check_strategy, log_stats, module_step
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
        self._deltasam_window = _Window()
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
            micro = _MicroBatchBackend(
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


class _Window:
    """Gradient accumulation over k micro-batches: the mean of their descent gradients, one optimizer step.

    A micro-batch whose step the engine skips (non-finite) poisons the window: its step is skipped as a whole.
    """

    def __init__(self) -> None:
        self.sum: list[Tensor] | None = None
        self.count = 0
        self.poisoned = False
        self.micro_batches = 0

    def count_micro_batch(self, k: int, last_batch: bool) -> bool:
        """Count one micro-batch; whether it ends the window (every k, and at an epoch's end)."""
        self.micro_batches += 1
        if self.micro_batches % k == 0 or last_batch:
            self.micro_batches = 0
            return True
        return False

    def add(self, params: list[Tensor]) -> None:
        """The engine's base step for a micro-batch: add its descent gradient, clear ``.grad``."""
        if self.sum is None:
            self.sum = [torch.zeros_like(p) for p in params]
        self.count += 1
        with torch.no_grad():
            present = [(a, p.grad) for a, p in zip(self.sum, params) if p.grad is not None]
            if present:
                torch._foreach_add_([a for a, _ in present], [g for _, g in present])
        for p in params:
            p.grad = None

    def close(self, params: list[Tensor], backend: LightningBackend, base_step: Callable[[], Any]) -> bool:
        """The window's one optimizer step on the mean gradient (or a skipped step); whether it was skipped."""
        acc, count, poisoned = self.sum, self.count, self.poisoned
        self.sum, self.count, self.poisoned = None, 0, False
        if poisoned or acc is None:
            backend.skip(params, base_step)
            for p in params:
                p.grad = None
            return True
        with torch.no_grad():
            torch._foreach_div_(acc, float(count))
        for p, a in zip(params, acc):
            p.grad = a
        base_step()
        return False


class _MicroBatchBackend(LightningBackend):
    """A micro-batch's backend: a skipped step poisons the window instead of stepping the optimizer."""

    window: _Window

    def skip(self, params: list[Tensor], base_step: Callable[[], Any]) -> None:
        self.window.poisoned = True
        for p in params:
            p.grad = None
