"""``DeltaSAMCallback``: SAM / delta-SAM for unmodified automatic-optimization LightningModules."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from torch.optim import Optimizer

from .config import SAMConfig
from .engine import SAMEngine, StepStats
from .head_probe import has_split, probe_plan
from .lightning_backend import LightningBackend, grad_scaler


class _SkipBatch(Exception):
    """training_step returned None at w: Lightning skips the batch, and so does the step."""


class DeltaSAMCallback(Callback):
    """Runs every optimizer step of the Trainer as a SAM / delta-SAM step; options as :class:`SAMConfig`.

    SAM works with any module: Lightning's closure runs at w (what ``training_step`` logs then
    stands) and again at w + eps (logging muted, hooks and gradient clipping applied to the
    descent gradient only). delta-SAM needs ``per_sample_loss(batch)`` on the module: the
    weighted first pass is computed from it and ``training_step`` runs once, at w + eps, so its
    logged loss is the perturbed one; the loss at w is logged as ``deltasam/loss``.
    Refused at fit start: manual optimization (use :class:`DeltaSAMMixin`), ``16-mixed``
    (its plugin steps without the closure), ``accumulate_grad_batches > 1``.
    """

    def __init__(self, **options: Any) -> None:
        self.config = SAMConfig(**options)
        self._engines: dict[int, SAMEngine] = {}
        self._pending_state: Optional[dict[str, Any]] = None
        self._restore: list[Callable[[], None]] = []
        self._batch: Any = None
        self.last_stats: Optional[StepStats] = None

    @property
    def state_key(self) -> str:
        return "DeltaSAMCallback"

    # ---------------------------------------------------------------- checks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        name = type(pl_module).__name__
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"DeltaSAMCallback needs automatic optimization, but {name} sets automatic_optimization=False. "
                "For manual optimization use DeltaSAMMixin instead."
            )
        if self.config.uses_probes and self.config.probe_scope == "head" and not has_split(pl_module):
            probe_plan(pl_module, None, "head")  # raises, naming the methods to define
        if self.config.reweighting and not callable(getattr(pl_module, "per_sample_loss", None)):
            raise ValueError(
                f"DeltaSAMCallback(reweight='delta') needs {name}.per_sample_loss(batch) returning per-instance "
                "losses of shape [B]; define it, or use reweight=None (plain SAM works with any module)."
            )
        if grad_scaler(trainer) is not None:
            raise ValueError(
                f"DeltaSAMCallback cannot run with precision={trainer.precision!r}: its GradScaler steps the optimizer "
                "without the closure, so the second pass cannot run. Use precision='bf16-mixed' or '32-true', "
                "or DeltaSAMMixin, which supports '16-mixed'."
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"DeltaSAMCallback cannot run with accumulate_grad_batches={trainer.accumulate_grad_batches}: "
                "the earlier micro-batches' gradients would enter the perturbation. Use 1."
            )

    # ----------------------------------------------------------- wrap / unwrap
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        for optimizer in trainer.optimizers:
            self._wrap(optimizer, trainer, pl_module)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._unwrap()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._unwrap()

    def _unwrap(self) -> None:
        while self._restore:
            self._restore.pop()()

    def _engine(self, optimizer: Optimizer) -> SAMEngine:
        engine = self._engines.get(id(optimizer))
        if engine is None:
            engine = SAMEngine(optimizer.param_groups, self.config)
            if self._pending_state is not None:
                engine.load_state_dict(self._pending_state)
                self._pending_state = None
            self._engines[id(optimizer)] = engine
        return engine

    def _wrap(self, optimizer: Optimizer, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        had_own = "step" in optimizer.__dict__
        original_step = optimizer.step
        engine = self._engine(optimizer)

        def step(closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:
            if closure is None:
                raise RuntimeError(
                    "DeltaSAMCallback: the optimizer was stepped without a closure, so the second pass cannot run "
                    f"(precision={trainer.precision!r}). Use DeltaSAMMixin for this setup."
                )
            return self._step(optimizer, engine, closure, lambda: original_step(**kwargs), trainer, pl_module)

        optimizer.step = step  # type: ignore[method-assign]

        def restore() -> None:
            if had_own:
                optimizer.step = original_step  # type: ignore[method-assign]
            else:
                optimizer.__dict__.pop("step", None)

        self._restore.append(restore)

    # ------------------------------------------------------------------ step
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        self._batch = batch
        self.last_stats = None

    def _step(
        self,
        optimizer: Optimizer,
        engine: SAMEngine,
        closure: Callable[[], Any],
        base_step: Callable[[], Any],
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
    ) -> Any:
        batch = self._batch
        # Lightning passes partial(precision._wrap_closure, model, optimizer, closure): its inner closure
        # runs training_step + backward without the before-step hooks and clipping (kept for the descent pass).
        inner = closure.args[2] if isinstance(closure, functools.partial) and len(closure.args) == 3 else closure
        first: dict[str, Any] = {}

        def first_pass() -> Tensor:
            loss = inner()
            if loss is None:
                raise _SkipBatch
            first["result"] = getattr(inner, "_result", None)
            return loss

        def second_pass() -> Tensor:
            if not first:
                return _require_loss(closure())
            with _muted_logging(pl_module):
                loss = closure()
            if first["result"] is not None:
                inner._result = first["result"]  # report the loss at w, as training_step logged it
            return _require_loss(loss)

        forward, head = None, None
        if self.config.reweighting:
            forward, head = probe_plan(pl_module, batch, self.config.probe_scope if self.config.uses_probes else "all")
        backend = LightningBackend(
            trainer,
            self.config,
            backward_fn=lambda loss: trainer.strategy.backward(loss, optimizer),
            buffers=lambda: list(pl_module.buffers()),
            forward_context=trainer.precision_plugin.train_step_context,
        )
        try:
            batch_size: Optional[int] = extract_batch_size(batch)
        except Exception:
            batch_size = None
        try:
            stats = engine.step(
                forward,
                backend,
                base_step,
                first_pass=first_pass,
                second_pass=second_pass,
                batch_size=batch_size,
                source=f"{type(pl_module).__name__}.per_sample_loss",
                head=head,
            )
        except _SkipBatch:
            return None
        finally:
            if head is not None:
                head.clear()
        self.last_stats = stats
        return stats.loss

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        stats = self.last_stats
        if stats is None:
            return
        engine = next(iter(self._engines.values()))
        pl_module.log("deltasam/loss", stats.loss, batch_size=_safe_batch_size(batch))
        pl_module.log_dict(stats.as_log_dict(engine.skipped_steps), batch_size=_safe_batch_size(batch))

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self._engines:
            return next(iter(self._engines.values())).state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._engines:
            next(iter(self._engines.values())).load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)


def _require_loss(loss: Any) -> Tensor:
    if loss is None:
        raise RuntimeError("training_step returned None at w + eps after returning a loss at w; it must be deterministic in that.")
    return loss


def _safe_batch_size(batch: Any) -> Optional[int]:
    try:
        return extract_batch_size(batch)
    except Exception:
        return None


class _muted_logging:
    """Turns ``self.log`` / ``self.log_dict`` into no-ops while training_step reruns at w + eps."""

    def __init__(self, module: "pl.LightningModule") -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.log = _no_log  # type: ignore[method-assign]
        self.module.log_dict = _no_log  # type: ignore[method-assign]

    def __exit__(self, *exc: Any) -> None:
        self.module.__dict__.pop("log", None)
        self.module.__dict__.pop("log_dict", None)


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None
