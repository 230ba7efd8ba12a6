"""torch.compile and the layer hooks: a compiled graph bypasses the forward hooks every per-instance user reads,
so a compiled module (or a compiled region calling a hooked layer) is refused by name."""

from __future__ import annotations

import torch
from torch import nn


def compiled_part(module: nn.Module) -> str | None:
    """The name of ``module`` or of a submodule compiled with ``torch.compile`` (or ``Module.compile()``), else None."""
    if getattr(module, "_compiler_ctx", None) is not None:  # Lightning's trainer.fit(torch.compile(module))
        return type(module).__name__
    for name, sub in module.named_modules():
        if type(sub).__name__ == "OptimizedModule" or getattr(sub, "_compiled_call_impl", None) is not None:
            return name or type(module).__name__
    return None


def check_not_compiled(module: nn.Module, who: str, way_out: str) -> None:
    """A clear error when ``module`` (or a part of it) is compiled: a compiled graph bypasses the forward hooks
    that read each layer's inputs and outputs, so the result would be silently wrong."""
    part = compiled_part(module)
    if part is not None:
        raise ValueError(
            f"{who} cannot run on a module compiled with torch.compile ({part} is compiled): the compiled graph "
            "bypasses the per-layer hooks it reads. Run the step on the uncompiled module (for "
            f"compiled = torch.compile(model), pass model, i.e. compiled._orig_mod), or {way_out}."
        )


def check_eager(who: str, way_out: str) -> None:
    """The same error from inside a hook that runs while torch.compile traces (a compiled function calling the layer)."""
    if torch.compiler.is_compiling():
        raise ValueError(
            f"{who} cannot run inside a torch.compile region: the compiled graph bypasses the per-layer "
            f"hooks it reads. Call the model eagerly in the loss, or {way_out}."
        )
