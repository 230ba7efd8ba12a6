"""Head-only probes: perturb just the top layers, on the first pass's cached activations (``probe_scope="head"``).

A module opts in by splitting its loss in two and naming the probed layers::

    def per_sample_features(self, batch) -> Tensor: ...            # everything below the head
    def per_sample_loss_from_features(self, features, batch) -> Tensor: ...   # head + loss, [B]
    def probe_head(self) -> nn.Module: ...                          # the probed layers

Probes then cost a few head evaluations instead of K model forwards, and run functionally
(``torch.func.functional_call``) after the first pass, so no live weight is touched while its
graph is alive. The head part must be deterministic (put dropout below the split).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor, nn
import torch
from torch.func import functional_call, vmap

SPLIT_METHODS = ("per_sample_features", "per_sample_loss_from_features", "probe_head")


def has_split(module: Any) -> bool:
    return all(callable(getattr(module, m, None)) for m in SPLIT_METHODS)


class _FromFeatures(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, features: Tensor, batch: Any) -> Tensor:
        return self.module.per_sample_loss_from_features(features, batch)


class HeadProbe:
    """Evaluates per-instance losses with the head's parameters replaced, on cached features."""

    def __init__(self, module: nn.Module) -> None:
        head = module.probe_head()
        names = {id(p): n for n, p in module.named_parameters()}
        self.params = [p for p in head.parameters() if p.requires_grad]
        missing = [p for p in self.params if id(p) not in names]
        if not self.params or missing:
            raise ValueError(f"{type(module).__name__}.probe_head() must return a submodule with trainable parameters.")
        self._names = [f"module.{names[id(p)]}" for p in self.params]
        self._wrapper = _FromFeatures(module)
        self._features: Optional[Tensor] = None
        self._batch: Any = None

    def losses(self, params: list[Tensor]) -> Tensor:
        if self._features is None:
            raise RuntimeError("HeadProbe.losses called before the first pass cached its features.")
        return functional_call(self._wrapper, dict(zip(self._names, params)), (self._features, self._batch), strict=False)

    def batched_losses(self, params: list[Tensor]) -> Tensor:
        """[P, B] losses for P parameter points (each of ``params`` stacked on a leading dim of P)."""
        try:
            return vmap(self.losses, in_dims=(0,), randomness="error")(params)
        except Exception:  # a head vmap cannot take: one call per point
            return torch.stack([self.losses([p[i] for p in params]) for i in range(params[0].shape[0])])

    def forward_fn(self, module: nn.Module, batch: Any) -> Callable[[], Tensor]:
        """The first-pass forward that also caches the features the probes reuse."""

        def forward() -> Tensor:
            features = module.per_sample_features(batch)
            self._features, self._batch = features.detach(), batch
            return module.per_sample_loss_from_features(features, batch)

        return forward

    def clear(self) -> None:
        self._features = self._batch = None


def probe_plan(module: nn.Module, batch: Any, scope: str) -> tuple[Callable[[], Tensor], Optional[HeadProbe]]:
    """(forward, head probe or None) for ``module`` on ``batch``: the split forward when ``scope='head'``
    (or ``'auto'`` and the module defines the split)."""
    if scope == "auto":
        scope = "head" if has_split(module) else "all"
    if scope != "head":
        return (lambda: module.per_sample_loss(batch)), None
    if not has_split(module):
        raise ValueError(
            f"probe_scope='head' needs {type(module).__name__} to define " + ", ".join(f"{m}()" for m in SPLIT_METHODS)
            + "; define them, or use probe_scope='all'."
        )
    head = HeadProbe(module)
    return head.forward_fn(module, batch), head
