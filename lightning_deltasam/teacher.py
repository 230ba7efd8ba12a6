"""The model's outputs at other weights (MESA's EMA of w): the weights swapped in, one forward without grad in
eval mode (no dropout, running statistics untouched), then w, the statistics and each module's mode put back
bit for bit, whatever the forward does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .distributed import local_tensors
from .passes import Passes
from .profiler import phase
from .restore import BufferPool, copy_all_

if TYPE_CHECKING:
    from .ascent.base import SAM
    from .options import VariantOptions


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside; every submodule's own mode restored on the way out."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def outputs_at(weights: list[Tensor], params: list[Tensor], passes: Passes, pool: BufferPool, rule: str) -> Tensor:
    """The forward's outputs (detached) with ``params`` holding ``weights``: each parameter's data is swapped for
    its teacher tensor and back (no copy of w, which is never written, so it comes back bit for bit); the running
    statistics are saved and put back too (eval mode leaves them, unless a module ignores its mode)."""
    if passes.module is None:
        raise ValueError(f"variant={rule!r} runs the model in eval mode at its EMA weights: pass the model (module=).")
    buffers = passes.backend.buffers()
    saved_buffers, saved = pool.saved("teacher_buffers", buffers), [p.data for p in params]
    try:
        with torch.no_grad(), evaluating(passes.module), phase("teacher_pass"):
            for p, w in zip(params, weights):
                p.data = w
            return passes.outputs(f"variant={rule!r}")[1].detach()
    finally:
        for p, w in zip(params, saved):
            p.data = w
        copy_all_(buffers, saved_buffers)


def teacher_term(
    rule: SAM, variant: VariantOptions, params: list[Tensor], passes: Passes, pool: BufferPool
) -> Callable[[Tensor], Tensor] | None:
    """The term a plain pass's loss gains from the outputs (MESA's KL, against the outputs at the rule's teacher
    weights, taken now; zero while it has none); None for a variant that reads no outputs."""
    if not variant.needs_outputs:
        return None
    teacher = rule.teacher_weights(params)
    target = outputs_at(teacher, local_tensors(params), passes, pool, variant.name) if teacher is not None else None
    return partial(rule.outputs_term, teacher_outputs=target)
