"""What DeltaSAM checks around a closure: which contract a closure follows (a gradient left by the caller's
backward, or none), what it returns, the BatchNorm warning without ``module=``, and the options that need the model."""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook

from .config import SAMConfig
from .options import VariantOptions, WeightingOptions
from .passes import check_per_sample_losses


class LeftoverGrads:
    """The ``.grad`` tensors a step left, to tell a new backward's gradient from them (weakly held)."""

    def __init__(self, config: SAMConfig) -> None:
        self.config = config
        # id(param) -> (weakref to the .grad a step left, its version, whether zero_grad zeroed it in place)
        self._left: dict[int, tuple[Any, int, bool]] = {}
        self._warned_accumulated = False

    def has_new(self, params: list[Tensor], two_step: bool = False) -> bool | None:
        """Whether a backward ran since this optimizer's last step: a ``.grad`` that is not the one the last step
        left there, or was changed since (None for ``two_step`` when no ``.grad`` is there at all). A gradient
        added onto the one the last step left (no zero_grad() before the backward) is warned once."""
        new, any_grad, accumulated = False, False, False
        for p in params:
            g = p.grad
            if g is None:
                continue
            any_grad = True
            left = self._left.get(id(p))
            if left is None or left[0]() is not g:
                new = True
            elif left[1] != g._version:  # a backward changed it: onto zeros (zero_grad) or onto the last step's
                new, accumulated = True, accumulated or not left[2]
        if accumulated and not self._warned_accumulated:
            self._warned_accumulated = True
            warnings.warn(
                "DeltaSAM: a backward added its gradient onto the one the last step left in .grad (no zero_grad() "
                "before it), so the step uses their sum. Call optimizer.zero_grad() before each step's first "
                "backward. (If you zeroed .grad in place yourself, call optimizer.zero_grad(set_to_none=False) "
                "instead: it is recognised.) Warned once.",
                RuntimeWarning,
                stacklevel=3,
            )
        if two_step:
            return new if any_grad else None
        if new and (self.config.reweighting or self.config.per_instance):
            option = f"m={self.config.m}" if self.config.per_instance else f"reweight={self.config.reweight.name!r}"  # type: ignore[union-attr]
            raise ValueError(
                f"{option} needs per-instance losses, but .grad holds gradients from a backward before "
                "step(closure) (the davda54/sam backward-closure contract, SAM / ASAM and the variants only). "
                "Call optimizer.zero_grad() before step(closure) and pass a closure returning the per-instance "
                "losses, shape [B]: the optimizer runs every backward. Nothing was changed."
            )
        return new

    def remember(self, params: list[Tensor], zeroed: bool = False) -> None:
        self._left = {id(p): (weakref.ref(p.grad), p.grad._version, zeroed) for p in params if p.grad is not None}


@contextmanager
def batchnorm_watch(enabled: bool) -> Iterator[None]:
    """Without ``module=``, the first step watches the modules that run: a BatchNorm (or any module with running
    statistics) in training mode is updated by both passes, which ``module=`` prevents; warned once."""
    if not enabled:
        yield
        return
    found: list[str] = []

    def watch(module: nn.Module, args: Any, output: Any) -> None:
        if not found and module.training and getattr(module, "running_mean", None) is not None:
            found.append(type(module).__name__)

    handle = register_module_forward_hook(watch)
    try:
        yield
    finally:
        handle.remove()
    if found:
        warnings.warn(
            f"DeltaSAM: the model has a {found[0]} in training mode, and DeltaSAM was not given the model: its "
            "running statistics are updated by both passes (at w and at w + eps). Pass "
            "DeltaSAM(..., module=model) so only the first pass updates them. Warned once.",
            RuntimeWarning,
            stacklevel=4,
        )


def checked_closure(closure: Callable[[], Any], config: SAMConfig) -> Callable[[], Tensor]:
    """The per-instance closure, with the error a scalar (backward-closure) return deserves."""

    def per_instance() -> Tensor:
        losses = closure()
        if config.variant.needs_outputs:  # the pair (losses, outputs): Passes.outputs checks it
            return losses
        if isinstance(losses, Tensor) and losses.dim() == 0:
            shape = "DeltaSAM closure must return per-instance losses of shape [B]; got shape () (a scalar)"
            if config.reweighting:
                raise ValueError(
                    f"reweight={config.reweight.name!r} needs per-instance losses: {shape}. Use reduction='none' and "  # type: ignore[union-attr]
                    "leave every backward to the optimizer."
                )
            raise ValueError(
                f"{shape}. Either use reduction='none' and leave every backward to the optimizer, or use "
                "the backward-closure contract of davda54/sam (SAM / ASAM): run loss.backward() before "
                "step(closure); the closure then runs forward and backward at w + eps."
            )
        return check_per_sample_losses(losses, "DeltaSAM closure")

    return per_instance


def rows_closure(closure: Callable[..., Any], config: SAMConfig) -> Callable[[Tensor], Any] | None:
    """ESAM's forward on chosen rows, ``closure(instances)`` (a LongTensor of rows); None for other variants."""
    if not config.variant.selects_instances:
        return None
    try:
        inspect.signature(closure).bind(None)
    except TypeError:
        raise ValueError(
            f"variant={config.variant.name!r} runs its second pass on chosen instances: write the closure as "
            "closure(instances=None), returning the per-instance losses of those rows (e.g. of x[instances], "
            "y[instances]; of every row when None). Nothing was changed."
        ) from None
    except ValueError:  # a signature that cannot be read: taken as it is
        pass
    return closure


def _arguments(factory: Callable[..., Any]) -> set[str]:
    """The keyword names ``factory`` accepts (empty when its signature cannot be read)."""
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


def refuse_sam_keywords(kwargs: dict[str, Any], base_optimizer: Callable[..., Any]) -> None:
    """A SAM option given as a keyword (the old flat spelling) is refused, unless the base optimizer takes it: the
    error names where the option lives now (SAMConfig, or the rule options class that declares it)."""
    owners = _option_owners()
    stray = sorted(set(kwargs) & set(owners) - _arguments(base_optimizer))
    if stray:
        name = stray[0]
        raise TypeError(
            f"DeltaSAM got {name}={kwargs[name]!r}, a SAM option: it goes in {owners[name]}, passed as "
            f"DeltaSAM(params, base_optimizer, SAMConfig(...), lr=...); the keywords are the base optimizer's."
        )


def _option_owners() -> dict[str, str]:
    """Option name -> where it is set: ``SAMConfig(name=...)`` or the rule options that declare it."""
    owners: dict[str, list[str]] = {}
    for registry in (VariantOptions.registry, WeightingOptions.registry):
        for cls in registry.values():
            for f in fields(cls):
                owners.setdefault(f.name, []).append(f"{cls.__name__}({f.name}=...)")
    out = {name: " or ".join(where) for name, where in owners.items()}
    out.update({name: f"SAMConfig({name}=...)" for name in SAMConfig.option_names()})
    out["estimator"] = "reweight=ProbeWeights(...) or reweight=GramWeights(...)"
    return out


def check_module_options(config: SAMConfig, module: nn.Module | None, grad_scaler: Any) -> None:
    """The options that need the model (or refuse a GradScaler), refused before anything is built."""
    if config.step_probe_scope == "head":
        raise ValueError(
            "probe_scope='head' is for modules that split their loss (DeltaSAMMixin, DeltaSAMCallback); "
            "DeltaSAM's closure returns losses only: use probe_scope='all'."
        )
    if config.hooks_layers and module is None:
        option = f"m={config.m}" if config.per_instance else f"reweight={config.reweight.name!r}"  # type: ignore[union-attr]
        raise ValueError(
            f"{option} forms per-instance gradients from the model's layers: pass the model, "
            "DeltaSAM(params, base_optimizer, sam, module=model)."
        )
    if config.variant.needs_outputs and module is None:
        raise ValueError(
            f"variant={config.variant.name!r} runs the model in eval mode at its EMA weights: pass the model, "
            "DeltaSAM(params, base_optimizer, sam, module=model)."
        )
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler={grad_scaler!r} must be a torch.amp.GradScaler (or None).")
    if grad_scaler is not None and config.per_instance:
        raise ValueError(
            f"m={config.m} with grad_scaler: the per-instance route does not unscale its gradients. Use "
            "bf16 autocast (no scaler), or m=None with the GradScaler."
        )
