"""``DeltaSAMCallback``: SAM / delta-SAM for unmodified automatic-optimization LightningModules."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from .config import Estimator, ProbeScale, ProbeScope, Reweight, SAMConfig, Score, Sync, Variant, Verify, Weighting
from .lightning_backend import EngineSlot, LightningBackend, check_strategy, grad_scaler, log_stats, module_step
from .parts import StepStats
from .probes import has_split, probe_plan


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
        rho: radius of the perturbation; ``0`` is the base optimizer (one pass).
        adaptive: ASAM: eps = rho T^2 g / ||T g||, T = |w| + ``eta``.
        eta: ASAM's and relative probes' offset.
        reweight: ``None``: SAM; ``"delta"``: delta-SAM.
        score: delta-SAM's instance score: ``"sharpness"``, ``"gradnorm"``, ``"loss"`` or ``"gram"``.
        weights: ``"softmax"`` (delta = softmax(s / (tau mean|s|))) or ``"linear"`` (delta proportional to max(s, 0)).
        temperature: tau of the softmax weights.
        mix: share of uniform weights mixed into delta.
        num_probes: K Gaussian probes (forward only).
        probe_std: sigma of the probes.
        probe_scale: ``"relative"`` (dw = sigma z (|w| + eta)) or ``"absolute"`` (sigma z).
        antithetic: also probe at w - dw.
        probe_scope: ``"all"`` parameters, the module's ``"head"`` split, or ``"auto"`` (head when the module splits).
        gram_ridge: lambda of the ``gram`` score, relative to mean diag(K).
        estimator: per-instance gradient information from ``"probes"``, or ``"exact"`` / ``"sketch"``: the Gram
            matrix of per-instance gradients from the first backward (the module's layers are hooked).
        sketch_rank: rank r of ``estimator="sketch"``.
        sync: DDP: ``"global"`` (the step over the global batch) or ``"local"`` (each rank's own eps).
        seed: seed of the probe generator (identical on every rank).
        m: instances per perturbation: ``None`` the whole batch (SAM), ``1`` exact per-instance SAM, ``k``
            m-sharpness over consecutive groups of k; needs ``per_sample_loss`` (the module's layers are hooked).
        match_rho: with ``m``, scale the radius each step to rho / (mean_i ||g_i|| / ||g_bar||), so that the mean
            first-order loss rise is SAM's at rho (rho in SAM's units).
        verify: with ``m`` or the Gram estimators, check the per-instance gradients against autograd: ``"auto"``
            (rows on each new shape signature, gradients on the first step), ``"always"`` or ``"off"``.
        variant: the ascent rule: ``"sam"`` (SAM / ASAM), ``"gsam"``, ``"wsam"``, ``"looksam"``, ``"friendly"``.
        interval: perturb every interval-th step (composer's SAM), a plain base step otherwise.
        alpha: GSAM's surrogate-gap weight (None: 0.4) or LookSAM's g_v weight (None: 0.7).
        min_rho: GSAM: rho follows the LR from ``rho`` (at the initial LR) down to ``min_rho`` (at LR 0); None: fixed.
        gamma: WSAM's sharpness weight, used as gamma / (1 - gamma).
        decouple: WSAM: apply the sharpness term after the base step (True) or inside it.
        k: LookSAM's period (SAM every k-th step).
        sigma: FriendlySAM's momentum subtraction.
        lmbda: FriendlySAM's momentum decay.
    """

    def __init__(
        self,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        reweight: Reweight = None,
        score: Score = "gradnorm",
        weights: Weighting = "softmax",
        temperature: float = 4.0,
        mix: float = 0.0,
        num_probes: int = 8,
        probe_std: float = 0.01,
        probe_scale: ProbeScale = "relative",
        antithetic: bool = False,
        probe_scope: ProbeScope = "auto",
        gram_ridge: float = 1e-3,
        estimator: Estimator = "probes",
        sketch_rank: int = 32,
        sync: Sync = "global",
        seed: int = 0,
        m: int | None = None,
        match_rho: bool = False,
        verify: Verify = "auto",
        variant: Variant = "sam",
        interval: int = 1,
        alpha: float | None = None,
        min_rho: float | None = None,
        gamma: float = 0.9,
        decouple: bool = True,
        k: int = 10,
        sigma: float = 1.0,
        lmbda: float = 0.9,
    ) -> None:
        self.config = SAMConfig(
            rho=rho,
            adaptive=adaptive,
            eta=eta,
            reweight=reweight,
            score=score,
            weights=weights,
            temperature=temperature,
            mix=mix,
            num_probes=num_probes,
            probe_std=probe_std,
            probe_scale=probe_scale,
            antithetic=antithetic,
            probe_scope=probe_scope,
            gram_ridge=gram_ridge,
            estimator=estimator,
            sketch_rank=sketch_rank,
            sync=sync,
            seed=seed,
            m=m,
            match_rho=match_rho,
            verify=verify,
            variant=variant,
            interval=interval,
            alpha=alpha,
            min_rho=min_rho,
            gamma=gamma,
            decouple=decouple,
            k=k,
            sigma=sigma,
            lmbda=lmbda,
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
            option = f"m={self.config.m}" if self.config.per_instance else "reweight='delta'"
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
        _refuse_accumulation(trainer)
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
            _refuse_accumulation(trainer)  # changed within the batch: refused before the update
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
        _refuse_accumulation(trainer)
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
                return _require_loss(closure())
            with _muted_logging(pl_module):
                loss = closure()
            if first["result"] is not None:
                set_result(first["result"])  # report the loss at w, as training_step logged it
            return _require_loss(loss)

        backend = LightningBackend(
            trainer,
            self.config,
            backward_fn=lambda loss: trainer.strategy.backward(loss, optimizer),
            buffers=lambda: list(pl_module.buffers()),
            forward_context=trainer.precision_plugin.train_step_context,
        )
        try:
            stats = module_step(
                self._slot.for_optimizer(optimizer),
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


def lightning_closure_parts(
    closure: Callable[[], Any],
) -> tuple[Callable[[], Any], Callable[[], Any], Callable[[Any], None]]:
    """The one place that reads Lightning internals: (inner closure, get its result, set its result).

    Lightning's automatic optimization (checked on lightning 2.6 by ``tests/test_adapters.py``) passes
    ``optimizer.step`` the closure ``functools.partial(precision._wrap_closure, model, optimizer, closure)``,
    whose third argument, the loop's ``Closure``, runs ``training_step`` + backward without the before-step
    hooks and gradient clipping (kept for the descent pass). ``Closure._result`` is what the loop reports
    as the step's output. Any other closure is run as it is, with no result to read or set.
    """
    inner = closure.args[2] if isinstance(closure, functools.partial) and len(closure.args) == 3 else closure

    def get_result() -> Any:
        return getattr(inner, "_result", None)

    def set_result(result: Any) -> None:
        inner._result = result  # type: ignore[union-attr]

    return inner, get_result, set_result


def _refuse_accumulation(trainer: pl.Trainer) -> None:
    """Raise if the Trainer accumulates gradients now, or a ``GradientAccumulationScheduler`` will make it.

    Lightning runs the earlier micro-batches' backward outside ``optimizer.step``: their gradients would enter
    the perturbation and then be cleared by the first pass, a silently wrong step.
    """
    fix = (
        "The callback steps on one batch; for accumulation use DeltaSAMMixin(accumulate_grad_batches=k) "
        "(manual optimization: each micro-batch gets its own perturbation), or accumulate_grad_batches=1."
    )
    for callback in cast(list[Callback], getattr(trainer, "callbacks", [])):
        if isinstance(callback, GradientAccumulationScheduler) and callback.going_to_accumulate_grad_batches():
            epoch, k = min((e, k) for e, k in callback.scheduling.items() if k > 1)
            raise ValueError(
                f"DeltaSAMCallback cannot run with GradientAccumulationScheduler(scheduling={callback.scheduling}): "
                f"it sets accumulate_grad_batches={k} from epoch {epoch}. Remove the scheduler. {fix}"
            )
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"DeltaSAMCallback cannot run with accumulate_grad_batches={trainer.accumulate_grad_batches} "
            f"(epoch {trainer.current_epoch}, step {trainer.global_step}). {fix}"
        )


def _require_loss(loss: Any) -> Tensor:
    if loss is None:
        raise RuntimeError(
            "training_step returned None at w + eps after returning a loss at w; it must be deterministic in that."
        )
    return loss


class _muted_logging:
    """Turns ``self.log`` / ``self.log_dict`` into no-ops while training_step reruns at w + eps."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.log = _no_log  # type: ignore[method-assign]
        self.module.log_dict = _no_log  # type: ignore[method-assign]

    def __exit__(self, *exc: Any) -> None:
        self.module.__dict__.pop("log", None)
        self.module.__dict__.pop("log_dict", None)


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None
