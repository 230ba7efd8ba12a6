"""The checks of :class:`~.capture.LayerCapture` that make a wrong per-instance gradient an error (module docstring
of :mod:`.capture`): every use of a parameter inside a recorded call, every call's rows the instances, and two
instances' gradients equal to autograd's."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .base import Kind, UnsupportedModuleError
from .rows import Record
from .terms import Term, as_matrix, materialize


class Recorded(Protocol):
    """What the checks read of a :class:`~.capture.LayerCapture` (which calls them): its recorded calls, which layers
    hold each parameter and under what name, who runs it and the way out, the calls' outputs and the terms."""

    records: list[Record]
    owners: dict[int, list[Kind]]
    names: dict[int, str]
    params: dict[int, Tensor]
    who: str
    way_out: str

    def outputs(self) -> list[Tensor]: ...

    def terms(self, m: int, dense: bool = False, consume: bool = False) -> dict[int, list[Term]]: ...


def check_uses(capture: Recorded, losses: Tensor) -> None:
    """Every use of a covered parameter in the graph is inside a recorded call of a layer holding it."""
    inside: dict[int, set] = {}  # node -> the kinds whose recorded call contains it
    for r in capture.records:
        stack, seen = [r.out.grad_fn if r.out is not None else None], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen or node in r.stops:
                continue
            seen.add(node)
            inside.setdefault(id(node), set()).add(id(r.kind))
            stack.extend(n for n, _ in node.next_functions if n is not None and not hasattr(n, "variable"))
    stack, seen = [losses.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is None:
                stack.append(nxt)
                continue
            pid = id(var)
            if pid in capture.owners and not inside.get(id(node), set()) & {id(k) for k in capture.owners[pid]}:
                raise UnsupportedModuleError(
                    f"{capture.names[pid]} is used outside the forward of the module that holds it (by "
                    f"{type(node).__name__}: e.g. an output layer F.linear(h, emb.weight), or weight[:T]): {capture.who} "
                    "would miss that use's share of each instance's gradient. Use it through a module (for a tied "
                    "head: an nn.Linear whose weight is the embedding's), freeze it (requires_grad=False), or "
                    f"{capture.way_out}."
                )


def tolerance(capture: Recorded) -> float:
    """Relative tolerance of the checks: a real mismatch is O(1); float64 models often compute parts in float32
    (transformers' RMSNorm), so float64 is not assumed to be exact."""
    return 1e-4 if {r.dtype for r in capture.records} <= {torch.float32, torch.float64} else 5e-2


def check_rows(capture: Recorded, losses: Tensor, scale: float) -> None:
    """Each call's rows are the instances: weighting instance i's loss by r_i scales exactly row i's gradient."""
    bsz = losses.numel()
    gen = torch.Generator().manual_seed(1234)
    weights = (1.0 + torch.rand(bsz, generator=gen, dtype=torch.float64)).to(losses.device, losses.dtype)
    grads = torch.autograd.grad(
        (losses * weights).sum() * scale, capture.outputs(), allow_unused=True, retain_graph=True
    )
    tol = tolerance(capture)
    for r, g in zip(capture.records, grads):
        assert r.call is not None
        if g is None or r.call.b is None:
            continue
        got = g.double().reshape(r.call.shape) / scale
        want = r.call.b.double() * weights.double().view(-1, *([1] * (got.dim() - 1)))
        err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)
        if err > tol:
            raise UnsupportedModuleError(
                f"the rows of {r.kind.name}'s input (shape {tuple(r.x.shape)}) are not the batch's {bsz} instances "
                f"(checked: {err:.1e} off): its first size equals the batch size, but it is shared by the batch "
                "(positions arange(T) or a [T, T] table with T == B), or rows are mixed across instances later in the "
                "forward. Give shared inputs a leading size of 1 "
                f"(positions of shape [1, T]), pad to a length other than the batch size, or {capture.way_out}."
            )


def check_grads(capture: Recorded, losses: Tensor, scale: float) -> None:
    """Two instances' per-instance gradients from the terms against autograd's, parameter by parameter."""
    bsz = losses.numel()
    terms = capture.terms(1)
    params = list(capture.params.values())
    tol = tolerance(capture)
    for i in sorted({0, bsz - 1}):
        auto = torch.autograd.grad(losses[i] * scale, params, allow_unused=True, retain_graph=True)
        onehot = torch.zeros(bsz, dtype=torch.float64, device=losses.device)
        onehot[i] = 1.0
        refs = [
            torch.zeros_like(p, dtype=torch.float64) if g is None else g.double() / scale for p, g in zip(params, auto)
        ]
        floor = 1e-3 * sum(float(r.square().sum()) for r in refs) ** 0.5  # a parameter's gradient
        for p, ref in zip(params, refs):  # below 1e-3 of the whole is compared on that scale (roundoff)
            mine = torch.zeros_like(ref)
            for term in terms.get(id(p), []):
                mine += materialize(term, as_matrix(p), onehot).double().reshape(p.shape)
            err = float((mine - ref).norm()) / max(float(ref.norm()), floor, 1e-30)
            if err > tol:
                raise UnsupportedModuleError(
                    f"{capture.who}: the per-instance gradient of {capture.names[id(p)]} differs from autograd's by "
                    f"{err:.1e} (relative, instance {i}): its layer is used in a way its kind does not model. "
                    f"Freeze it (requires_grad=False), or {capture.way_out}."
                )
