"""``DeltaSAM``: SAM / delta-SAM as a plain ``torch.optim`` optimizer wrapping any base optimizer."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .config import SAMConfig
from .engine import SAMEngine, StepStats, make_backend


class DeltaSAM(Optimizer):
    """SAM (``reweight=None``) or delta-SAM (``reweight="delta"``) around a base optimizer.

    ``step(closure)`` runs every forward and backward itself: ``closure()`` must return the
    per-instance losses, shape [B], with grad enabled. It returns those losses at the
    unperturbed weights (detached). ``param_groups`` and ``state`` are the base optimizer's,
    so LR schedulers work unchanged. Pass ``module=`` so running statistics (BatchNorm) are
    updated by the first pass only (and, for ``estimator="exact"``/``"sketch"``, so its layers can be hooked). Every keyword that is not a SAM option goes to the base
    optimizer.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Union[type[Optimizer], Callable[..., Optimizer]],
        *,
        module: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        if not callable(base_optimizer):
            raise TypeError(f"base_optimizer={base_optimizer!r} must be an optimizer class such as torch.optim.AdamW.")
        config, base_kwargs = SAMConfig.split(kwargs)
        if config.step_probe_scope == "head":
            raise ValueError(
                "probe_scope='head' is for modules that split their loss (DeltaSAMMixin, DeltaSAMCallback); "
                "DeltaSAM's closure returns losses only: use probe_scope='all'."
            )
        if config.uses_gram and module is None:
            raise ValueError(
                f"estimator={config.estimator!r} forms per-instance gradients from the model's layers: "
                "pass the model, DeltaSAM(params, base_optimizer, module=model, ...)."
            )
        super().__init__(params, dict(base_kwargs))
        self.base_optimizer: Optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = self.base_optimizer.defaults
        self.state = self.base_optimizer.state
        self.config = config
        self.engine = SAMEngine(self.param_groups, config)
        self._module = module
        self.last_stats: Optional[StepStats] = None

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Tensor:  # type: ignore[override]
        """One SAM / delta-SAM step; returns the per-instance losses at w."""
        if closure is None:
            raise ValueError(
                "DeltaSAM.step needs closure=..., a function returning per-instance losses of shape [B]: "
                "SAM evaluates the loss at two points, so the optimizer runs the passes itself."
            )
        buffers = (lambda: list(self._module.buffers())) if self._module is not None else None
        backend = make_backend(self.config, buffers)
        with torch.enable_grad():
            stats = self.engine.step(closure, backend, self.base_optimizer.step, source="DeltaSAM closure", module=self._module)
        self.last_stats = stats
        assert stats.losses is not None
        return stats.losses

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a ``"deltasam"`` entry (probe generator, counters)."""
        state = self.base_optimizer.state_dict()
        state["deltasam"] = self.engine.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        engine_state = state_dict.pop("deltasam", None)
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.engine.param_groups = self.param_groups
        if engine_state is not None:
            self.engine.load_state_dict(engine_state)

    def __repr__(self) -> str:
        return f"DeltaSAM({self.config}, base={self.base_optimizer!r})"
