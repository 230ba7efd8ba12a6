"""The probes of delta-SAM's scores: forward-only evaluations of the per-instance losses at w + dw_k.

Two kinds (``probe_scope``):

- ``all``: every parameter perturbed, K model forwards, the first pass's dropout masks replayed
  (:func:`full_probes`);
- ``head``: only the module's top layers, evaluated functionally (``torch.func.functional_call``,
  all K in one ``vmap``) on the first pass's cached features (:class:`HeadProbe`,
  :func:`head_probes`). A module opts in by splitting its loss in two and naming the probed layers::

    def per_sample_features(self, batch) -> Tensor: ...                       # everything below the head
    def per_sample_loss_from_features(self, features, batch) -> Tensor: ...   # head + loss, [B]
    def probe_head(self) -> nn.Module: ...                                    # the probed layers

  The head part must be deterministic (put dropout below the split).

The noise dw comes from :class:`ProbeNoise`, seeded identically on every rank and saved in checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .delta_weights import ProbeLosses

LossFn = Callable[[], Tensor]
SPLIT_METHODS = ("per_sample_features", "per_sample_loss_from_features", "probe_head")


class ProbeNoise:
    """dw = sigma z (absolute) or sigma z * (|w| + eta) (relative), z ~ N(0, I) from one seeded generator per device
    type. ``std`` is sigma; ``eta`` the relative offset, None for absolute probes."""

    def __init__(self, seed: int, std: float = 0.01, eta: float | None = 0.01) -> None:
        self.seed, self.std, self.eta = seed, std, eta
        self._generators: dict[str, torch.Generator] = {}
        self._pending: dict[str, Tensor] = {}
        self.rank: int | None = None  # set under sharding (FSDP): each rank draws its shard's noise from its own stream

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator for ``device``'s type: seeded identically on every rank (or restored from a checkpoint)."""
        key = device.type
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if key in self._pending:
                gen.set_state(self._pending.pop(key))
            self._generators[key] = gen
        return self._generators[key]

    def draw(self, params: list[Tensor]) -> list[Tensor]:
        device = params[0].device
        numels = [p.numel() for p in params]
        generator = self.generator(device)
        if self.rank is not None:
            # Sharded parameters: rank r's elements are other elements than rank 0's, so they must not get the same
            # numbers. A seed drawn from the shared stream (which stays identical on every rank, and checkpointed)
            # plus the rank starts this draw's own stream: independent noise, the same distribution.
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
            generator = torch.Generator(device=device).manual_seed(seed + self.rank)
        flat = torch.randn(sum(numels), generator=generator, device=device, dtype=torch.float32)
        noise = [
            z.view_as(p) if z.dtype == p.dtype else z.view_as(p).to(p.dtype) for z, p in zip(flat.split(numels), params)
        ]
        if self.eta is not None:
            mag = torch._foreach_abs(params)
            torch._foreach_add_(mag, self.eta)
            torch._foreach_mul_(noise, mag)
        torch._foreach_mul_(noise, self.std)
        return noise

    def state_dict(self) -> dict[str, Tensor]:
        states = {k: g.get_state() for k, g in self._generators.items()}
        states.update({k: v for k, v in self._pending.items() if k not in states})
        return states

    def load_state_dict(self, states: dict[str, Any]) -> None:
        self._pending = {}
        for key, st in states.items():
            st = st.cpu() if isinstance(st, Tensor) else st
            if key in self._generators:
                self._generators[key].set_state(st)
            else:
                self._pending[key] = st


class RNGReplay:
    """Replays one RNG state, so probes and the first pass draw the same dropout masks."""

    def __init__(self, devices: set[torch.device]) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}

    def rewind(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in self.cuda.items():
            torch.cuda.set_rng_state(s, d)


def full_probes(
    count: int,
    antithetic: bool,
    params: list[Tensor],
    noise: ProbeNoise,
    forward: LossFn,
    rng: RNGReplay,
    restore: Callable[[], None],
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
) -> ProbeLosses:
    """K forward-only evaluations of the per-instance losses at w + dw_k (and w - dw_k if antithetic).

    ``restore()`` puts w back after each probe; the caller restores again if a probe raises.
    """
    plus, minus = [], []
    with torch.no_grad(), forward_context():
        for _ in range(count):
            dw = noise.draw(params)
            torch._foreach_add_(params, dw)
            rng.rewind()
            plus.append(forward().detach().float())
            if antithetic:
                torch._foreach_add_(params, dw, alpha=-2.0)
                rng.rewind()
                minus.append(forward().detach().float())
            restore()
    return ProbeLosses(torch.stack(plus), torch.stack(minus) if minus else None)


def head_probes(count: int, antithetic: bool, head: HeadProbe, noise: ProbeNoise) -> ProbeLosses:
    """K probes of the head alone, functional (no live weight changes), on the first pass's features.

    All K (and their antithetic twins) are evaluated in one vmapped call of the head.
    """
    base = [p.detach() for p in head.params]
    draws = [noise.draw(base) for _ in range(count)]
    stacked = [torch.stack(ns) for ns in zip(*draws)]  # per parameter: [K, *shape]
    points = [b.unsqueeze(0) + n for b, n in zip(base, stacked)]
    if antithetic:
        points = [torch.cat([pt, b.unsqueeze(0) - n]) for pt, b, n in zip(points, base, stacked)]
    with torch.no_grad():
        losses = head.batched_losses(points).float()
    return ProbeLosses(losses[:count], losses[count:] if antithetic else None)


def has_split(module: Any) -> bool:
    return all(callable(getattr(module, m, None)) for m in SPLIT_METHODS)


class _FromFeatures(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module: Any = module  # defines the split methods (checked by has_split)

    def forward(self, features: Tensor, batch: Any) -> Tensor:
        return self.module.per_sample_loss_from_features(features, batch)


class HeadProbe:
    """Evaluates per-instance losses with the head's parameters replaced, on cached features."""

    def __init__(self, module: nn.Module) -> None:
        head = cast(Any, module).probe_head()
        names = {id(p): n for n, p in module.named_parameters()}
        self.params = [p for p in head.parameters() if p.requires_grad]
        missing = [p for p in self.params if id(p) not in names]
        if not self.params or missing:
            raise ValueError(f"{type(module).__name__}.probe_head() must return a submodule with trainable parameters.")
        self._names = [f"module.{names[id(p)]}" for p in self.params]
        self._wrapper = _FromFeatures(module)
        self._features: Tensor | None = None
        self._batch: Any = None

    def losses(self, params: list[Tensor]) -> Tensor:
        if self._features is None:
            raise RuntimeError("HeadProbe.losses called before the first pass cached its features.")
        return functional_call(
            self._wrapper, dict(zip(self._names, params)), (self._features, self._batch), strict=False
        )

    def batched_losses(self, params: list[Tensor]) -> Tensor:
        """[P, B] losses for P parameter points (each of ``params`` stacked on a leading dim of P)."""
        try:
            return vmap(self.losses, in_dims=(0,), randomness="error")(params)
        except Exception:  # a head vmap cannot take: one call per point
            return torch.stack([self.losses([p[i] for p in params]) for i in range(params[0].shape[0])])

    def forward_fn(self, module: nn.Module, batch: Any) -> Callable[[], Tensor]:
        """The first-pass forward that also caches the features the probes reuse."""

        def forward() -> Tensor:
            split: Any = module  # defines the split methods (checked by has_split)
            features = split.per_sample_features(batch)
            self._features, self._batch = features.detach(), batch
            return split.per_sample_loss_from_features(features, batch)

        return forward

    def clear(self) -> None:
        self._features = self._batch = None


def probe_plan(module: nn.Module, batch: Any, scope: str) -> tuple[Callable[[], Tensor], HeadProbe | None]:
    """(forward, head probe or None) for ``module`` on ``batch``: the split forward when ``scope='head'``
    (or ``'auto'`` and the module defines the split). ``scope`` is usually ``SAMConfig.step_probe_scope``."""
    if scope == "auto":
        scope = "head" if has_split(module) else "all"
    if scope != "head":
        return (lambda: cast(Any, module).per_sample_loss(batch)), None
    if not has_split(module):
        raise ValueError(
            f"probe_scope='head' needs {type(module).__name__} to define "
            + ", ".join(f"{m}()" for m in SPLIT_METHODS)
            + "; define them, or use probe_scope='all'."
        )
    head = HeadProbe(module)
    return head.forward_fn(module, batch), head
