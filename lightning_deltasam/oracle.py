"""Exact per-instance SAM (the oracle) and the fidelity measure, for measurement only (docs/algorithm.md,
"How a rule is judged").

The oracle perturbs each instance by its own eps_i = rho g_i/||g_i|| and averages the
gradients at w + eps_i. Two routes give it: the batched one of :mod:`.instance_perturbation` (``m=1``: one
forward/backward pair per pass, for models whose trainable layers are Linear, Embedding and
LayerNorm) and the loop (n + 1 backward passes' worth: any model, and ASAM). The loop is the
reference the batched route is tested against. Per-sample gradients come from ``torch.func``
(vmap of grad); models it cannot take use a loop of backward passes. Run it with the model in
eval mode: the measure compares methods on the same deterministic function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from .backend import Backend
from .config import SAMConfig
from .distributed import Reducer
from .engine import SAMEngine
from .passes import Passes

PerSampleLoss = Callable[[Any], Tensor]  # batch -> [B] losses, computed with the module's current parameters


def instances_in(batch: Any) -> int:
    """The number of instances in ``batch``: the one leading size all its tensors share (refused otherwise)."""
    sizes = {t.shape[0] for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"cannot tell the batch size: tensors have leading sizes {sorted(sizes)}.")
    return sizes.pop()


def slice_batch(batch: Any, index: Any) -> Any:
    """The sub-batch ``index`` (an int keeps a leading dimension of 1) of every tensor in ``batch``."""
    if isinstance(index, int):
        index = slice(index, index + 1)
    return tree_map(lambda t: t[index] if isinstance(t, Tensor) and t.dim() > 0 else t, batch)


class _LossModule(nn.Module):
    """Makes ``loss_fn(batch)`` the forward of a module that owns ``module``, for functional_call."""

    def __init__(self, module: nn.Module, loss_fn: PerSampleLoss) -> None:
        super().__init__()
        self.module = module
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self._loss_fn(batch)


def _named_trainable(module: nn.Module) -> dict[str, Tensor]:
    return {f"module.{k}": v.detach() for k, v in module.named_parameters() if v.requires_grad}


def per_sample_grads(
    module: nn.Module, loss_fn: PerSampleLoss, batch: Any, method: str = "auto", params: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """{name: [B, *shape]} gradients of each instance's loss, at ``params`` (default: the module's)."""
    wrapper = _LossModule(module, loss_fn)
    base = params if params is not None else _named_trainable(module)
    if method in ("auto", "func"):
        try:
            return _per_sample_grads_func(wrapper, batch, base)
        except Exception:
            if method == "func":
                raise
    return _per_sample_grads_loop(wrapper, batch, base)


def _per_sample_grads_func(wrapper: _LossModule, batch: Any, params: dict[str, Tensor]) -> dict[str, Tensor]:
    buffers = {f"module.{k}": v for k, v in wrapper.module.named_buffers()}

    def one(p: dict[str, Tensor], sample: Any) -> Tensor:
        single = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, sample)
        return functional_call(wrapper, {**p, **buffers}, (single,)).sum()

    in_dims = tree_map(lambda t: 0 if isinstance(t, Tensor) and t.dim() > 0 else None, batch)
    return vmap(grad(one), in_dims=(None, in_dims))(params, batch)


def _per_sample_grads_loop(wrapper: _LossModule, batch: Any, params: dict[str, Tensor]) -> dict[str, Tensor]:
    buffers = {f"module.{k}": v for k, v in wrapper.module.named_buffers()}
    rows: list[tuple[Tensor, ...]] = []
    for i in range(instances_in(batch)):
        leaf = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = functional_call(wrapper, {**leaf, **buffers}, (slice_batch(batch, i),)).sum()
        rows.append(torch.autograd.grad(loss, list(leaf.values()), allow_unused=True, materialize_grads=True))
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(params)}


@dataclass
class OracleResult:
    """The mean gradient g_bar at w and the per-instance SAM update gradient u* (flat vectors)."""

    mean_grad: Tensor
    update: Tensor
    per_sample_grad_norms: Tensor
    rows: Tensor | None = None  # [B, P] per-instance gradients at w, when asked for


def _flat_rows(grads: dict[str, Tensor]) -> Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def instance_update(module: nn.Module, loss_fn: PerSampleLoss, batch: Any, rho: float, m: int = 1) -> Tensor:
    """u* (flat) by the batched route: the descent gradient of the ``m=1`` step (``m=k``: m-sharpness), weights untouched."""
    return method_update(module, lambda: loss_fn(batch), SAMConfig(rho=rho, m=m))


def batched_route_supported(module: nn.Module) -> bool:
    """Whether :func:`instance_update` can take ``module`` (every trainable layer of a kind in :mod:`.layers`)."""
    from .instance_perturbation import InstancePerturbation
    from .layers import UnsupportedModuleError

    try:
        InstancePerturbation(module, [p for p in module.parameters() if p.requires_grad])
    except (UnsupportedModuleError, ValueError):
        return False
    return True


def oracle_update(
    module: nn.Module,
    loss_fn: PerSampleLoss,
    batch: Any,
    rho: float,
    adaptive: bool = False,
    eta: float = 0.01,
    method: str = "auto",
    keep_rows: bool = False,
    route: str = "loop",
) -> OracleResult:
    """Exact per-instance SAM: u* = mean_i grad l_i(w + eps_i), eps_i = rho g_i/||g_i|| (ASAM: rho T^2 g_i/||T g_i||).

    ``route``: ``"loop"`` (a backward per instance), ``"batched"`` (:func:`instance_update`; not for ASAM) or
    ``"auto"`` (batched where the model allows it). The per-instance gradients at w (``rows``, their norms and
    mean) come from ``method`` ("auto", "func" or "loop") either way.
    """
    if route not in ("loop", "batched", "auto"):
        raise ValueError(f"route={route!r} is not supported; use 'loop', 'batched' or 'auto'.")
    batched = route == "batched" or (route == "auto" and not adaptive and batched_route_supported(module))
    if batched and adaptive:
        raise ValueError(
            "route='batched' cannot apply ASAM's per-instance perturbation (adaptive=True); use route='loop'."
        )
    params = _named_trainable(module)
    g = per_sample_grads(module, loss_fn, batch, method, params)
    rows = _flat_rows(g)
    if batched:
        update = instance_update(module, loss_fn, batch, rho)
        return OracleResult(rows.mean(dim=0), update, rows.norm(dim=1), rows if keep_rows else None)
    flat_w = torch.cat([p.reshape(-1) for p in params.values()])
    if adaptive:
        t = flat_w.abs() + eta
        direction = rows * t
        norms = direction.norm(dim=1, keepdim=True)
        eps = torch.where(norms > 0, rho * t * direction / norms, torch.zeros_like(rows))
    else:
        norms = rows.norm(dim=1, keepdim=True)
        eps = torch.where(norms > 0, rho * rows / norms, torch.zeros_like(rows))
    n = rows.shape[0]
    updates = []
    shapes = [(k, p.shape, p.numel()) for k, p in params.items()]
    for i in range(n):  # instance i's loss at its own w + eps_i
        offset, perturbed = 0, {}
        for k, shape, numel in shapes:
            perturbed[k] = params[k] + eps[i, offset : offset + numel].view(shape)
            offset += numel
        gi = per_sample_grads(module, loss_fn, slice_batch(batch, i), method, perturbed)
        updates.append(_flat_rows(gi)[0])
    return OracleResult(
        rows.mean(dim=0), torch.stack(updates).mean(dim=0), rows.norm(dim=1), rows if keep_rows else None
    )


def method_update(
    module: nn.Module,
    forward: Callable[[], Tensor],
    config: SAMConfig,
    engine: SAMEngine | None = None,
    head: Any | None = None,
) -> Tensor:
    """The update gradient a SAM / delta-SAM step would hand its base optimizer (flat), weights untouched.

    ``forward()`` returns the batch's per-instance losses; ``head`` is a head probe (probe_scope='head').
    """
    params: list[Tensor] = [p for p in module.parameters() if p.requires_grad]
    engine = engine or SAMEngine([{"params": params}], config)
    captured: list[Tensor] = []

    def capture() -> None:
        captured.extend(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params)

    with torch.enable_grad():
        engine.step(Passes(forward, Backend(Reducer()), module=module, head=head), capture)
    engine.zero_grad(params)
    if not captured:
        raise RuntimeError("the step was skipped (non-finite loss or gradient): no update to measure.")
    return torch.cat([c.reshape(-1) for c in captured])


def weighted_sam_update(
    module: nn.Module, loss_fn: PerSampleLoss, batch: Any, rho: float, delta: Tensor, rows: Tensor
) -> Tensor:
    """grad mean_i l_i(w + eps), eps = rho g_delta/||g_delta||, g_delta = delta^T rows: SAM along given weights."""
    params = [p for p in module.parameters() if p.requires_grad]
    g = delta.to(rows.dtype) @ rows
    norm = g.norm()
    eps = rho * g / norm if norm > 0 else torch.zeros_like(g)
    backup = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            offset = 0
            for p in params:
                p.add_(eps[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(batch).mean(), params, allow_unused=True, materialize_grads=True)
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
    return torch.cat([gr.reshape(-1) for gr in grads])


def fidelity(update: Tensor, oracle: Tensor, mean_grad: Tensor) -> tuple[float, float]:
    """(correction fidelity cos(u - g_bar, u* - g_bar), relative error ||u - u*|| / ||u* - g_bar||)."""
    a, b = (update - mean_grad).double(), (oracle - mean_grad).double()
    cos = float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300))
    rel = float((update - oracle).double().norm() / b.norm().clamp_min(1e-300))
    return cos, rel
