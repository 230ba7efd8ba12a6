"""What every layer kind shares: the trainable parameters it holds, how its calls are regrouped per instance, and the
interface the Gram capture and the per-instance route call (:class:`Kind`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .terms import Full, Term


class UnsupportedModuleError(TypeError):
    """A trainable parameter lives in a module (or is used in a way) whose per-instance gradients cannot be formed."""


def grouped(t: Tensor, bsz: int, m: int) -> Tensor:
    """[B, T, *rest] -> [G, m T, *rest], G = ceil(B / m): consecutive instances, zero-padded to G m."""
    if m == 1:
        return t
    groups = -(-bsz // m)
    if groups * m != bsz:
        t = torch.cat([t, t.new_zeros((groups * m - bsz, *t.shape[1:]))])
    return t.reshape(groups, m * t.shape[1], *t.shape[2:])


def ungrouped(t: Tensor, bsz: int, m: int, tokens: int) -> Tensor:
    """[G, m T, *rest] -> [B, T, *rest]: the inverse of :func:`grouped`."""
    return t if m == 1 else t.reshape(-1, tokens, *t.shape[2:])[:bsz]


def group_sum(t: Tensor, bsz: int, m: int) -> Full:
    """A per-instance [B, N, F] summed over each group's instances and tokens: a Full term [G, 1, F]."""
    return Full(grouped(t.sum(1, keepdim=True), bsz, m).sum(1, keepdim=True))


def per_instance(v: Tensor, bsz: int, m: int) -> Tensor:
    """A per-group tensor [G, *] as a per-instance one [B, *]."""
    return v.repeat_interleave(m, dim=0)[:bsz] if m > 1 else v


def cat_tokens(parts: list[Tensor], dim: int) -> Tensor:
    """torch.cat, except that one part is returned as it is (a view: layers reading one input share its storage)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def wide(t: Tensor) -> Tensor:
    """At least float32 (float64 stays float64): per-instance pieces are kept at the model's precision or better."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class Call:
    """One recorded call of a layer: its input ``x`` as [B, ...] (after broadcasting or un-flattening rows), its
    output's shape read the same way, and the output's gradient ``b`` once the first pass's backward has run."""

    def __init__(self, x: Tensor, shape: tuple[int, ...]) -> None:
        self.x, self.shape = x, shape
        self.b: Tensor | None = None

    @property
    def grad(self) -> Tensor:
        """The output gradient (the capture hands kinds only calls that have one)."""
        assert self.b is not None
        return self.b


class Kind:
    """A layer kind: recognises its modules, states each instance's share of its parameters' gradients as
    :mod:`.terms`, and corrects its output in the second pass for per-instance perturbations.

    Args:
        name: the module's qualified name (for errors).
        module: the layer.
        params: its trainable parameters by role (``"weight"``, ``"bias"``), only those being perturbed.
    """

    label: ClassVar[str] = "layer"
    roles: ClassVar[tuple[str, ...]] = ("weight", "bias")

    def __init__(self, name: str, module: nn.Module, params: dict[str, Tensor]) -> None:
        self.name, self.module, self.params = name, module, params
        self.busy = False  # the kind is calling its own module (a probe): the hooks let that call through

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """Whether ``module`` is of this kind (exactly: a subclass with its own forward is not, unless verified)."""
        raise NotImplementedError

    def input_of(self, inputs: tuple) -> Tensor:
        """The tensor whose leading size says which instance a row belongs to."""
        return inputs[0]

    def register(self, hook: Callable[[nn.Module, tuple, Tensor], Tensor | None]) -> list[RemovableHandle]:
        """Install ``hook(module, inputs, out)`` as the module's forward hook (a kind may wrap the forward too)."""
        return [self.module.register_forward_hook(hook)]

    def check(self) -> None:
        """Refuse a configuration of the module whose per-instance gradients this kind cannot form."""

    def refusal(self, why: str) -> UnsupportedModuleError:
        """The error for this module: ``why``, and the two ways out."""
        return UnsupportedModuleError(
            f"{self.name} ({type(self.module).__name__}) {why}. Freeze its parameters (requires_grad=False), or use "
            "plain SAM (m=None) / a probe rule."
        )

    def terms(self, calls: list[Call], bsz: int, m: int, dense: bool) -> list[tuple[Tensor, Term]]:
        """(parameter, its share of every group's gradient) for each trainable parameter; ``dense``: a Full term may
        replace a token term where forming G_g costs fewer FLOPs (not for the Gram, nor for tied weights)."""
        raise NotImplementedError

    def correct(self, x: Tensor, out: Tensor, eps: dict[int, list[Term]], bsz: int, m: int, cache: dict) -> Tensor:
        """``out`` ([B, ...]) as if each instance's parameters were moved by its group's eps (``{id(param): terms}``)."""
        raise NotImplementedError
