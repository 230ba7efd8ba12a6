"""The layer kinds the capture reads, which of them holds each trainable parameter, and the modules it refuses."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import Kind, UnsupportedModuleError
from .batchnorm import BatchNormKind
from .conv import Conv2dKind
from .embedding import EmbeddingKind
from .linear import LinearKind
from .norm import NormKind

KINDS: tuple[type[Kind], ...] = (LinearKind, EmbeddingKind, NormKind, Conv2dKind, BatchNormKind)
SUPPORTED_TEXT = (
    "Linear, transformers' Conv1D, Embedding (and verified scaled lookups), LayerNorm, RMSNorm (torch's and "
    "transformers'), Conv2d (groups=1), BatchNorm in eval mode"
)


def owned_kinds(
    module: nn.Module, params: Sequence[Tensor], who: str, way_out: str
) -> tuple[list[Kind], dict[int, list[Kind]]]:
    """Every submodule of ``module`` holding one of ``params`` (trainable) as a checked :class:`~.base.Kind`, and
    {id(param): the kinds holding it}; a parameter no kind can hold, or held outside ``module``, is refused."""
    wanted = {id(p) for p in params}
    owners: dict[int, list[Kind]] = {}
    kinds: list[Kind] = []
    for name, sub in module.named_modules():
        own = {n: p for n, p in sub.named_parameters(recurse=False) if id(p) in wanted and p.requires_grad}
        if not own:
            continue
        where = name or type(module).__name__
        kind_type = next((k for k in KINDS if k.matches(sub)), None)
        extra = [n for n in own if kind_type is None or n not in kind_type.roles]
        if kind_type is None or extra:
            names = ", ".join(f"{where}.{n}" for n in (extra or own))
            raise UnsupportedModuleError(
                f"{who} cannot form per-instance gradients of {type(sub).__name__} (trainable {names}); supported: "
                f"{SUPPORTED_TEXT}. Freeze those parameters (requires_grad=False), or {way_out}."
            )
        kind = kind_type(where, sub, own)
        kind.check()
        kinds.append(kind)
        for p in own.values():
            owners.setdefault(id(p), []).append(kind)
    missing = wanted - set(owners)
    if missing:
        raise UnsupportedModuleError(
            f"{len(missing)} trainable parameter(s) are not owned by a submodule of {type(module).__name__}: "
            f"{who} needs every optimized parameter inside the module it hooks."
        )
    return kinds, owners


def checkpointing_message(who: str, way_out: str) -> str:
    return (
        f"{who} cannot run with reentrant gradient checkpointing (torch.utils.checkpoint(use_reentrant=True), "
        "transformers' gradient_checkpointing_enable()): the layers' outputs are not in the graph it reads. Use "
        "use_reentrant=False, turn it off (model.gradient_checkpointing_disable()), or "
        f"{way_out}."
    )
