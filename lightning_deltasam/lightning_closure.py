"""The Lightning internals the callback reads, in one place: the loop's closure and its result, the accumulation it
refuses, and logging muted while ``training_step`` reruns at w + eps (checked on lightning 2.6 by the tests)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from torch import Tensor


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


def refuse_accumulation(trainer: pl.Trainer) -> None:
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


def require_loss(loss: Any) -> Tensor:
    if loss is None:
        raise RuntimeError(
            "training_step returned None at w + eps after returning a loss at w; it must be deterministic in that."
        )
    return loss


class muted_logging:
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
