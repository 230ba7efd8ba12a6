"""The forwards of one step (:class:`Passes`), the checks of what a closure returns, and what the first half of a
step leaves for the second (:class:`Pending`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .backend import Backend
from .probing import HeadProbe, LossFn
from .restore import Snapshot
from .stats import StepStats


def check_per_sample_losses(losses: Any, source: str, batch_size: int | None = None) -> Tensor:
    """A clear error unless ``losses`` is a float tensor of shape [B] (B = ``batch_size`` when known)."""
    if not isinstance(losses, Tensor):
        pair = " (a pair (losses, outputs) is for variant='mesa')" if isinstance(losses, tuple) else ""
        raise TypeError(
            f"{source} must return a tensor of per-instance losses of shape [B]; got {type(losses).__name__}{pair}."
        )
    shape = tuple(losses.shape)
    if losses.dim() != 1:
        hint = " (a scalar: use reduction='none')" if losses.dim() == 0 else ""
        raise ValueError(f"{source} must return per-instance losses of shape [B]; got shape {shape}{hint}.")
    if not losses.is_floating_point():
        raise TypeError(f"{source} must return a floating-point tensor; got dtype {losses.dtype} of shape {shape}.")
    if losses.numel() == 0:
        raise ValueError(f"{source} returned an empty tensor of shape {shape}: the batch is empty.")
    if batch_size is not None and losses.numel() != batch_size:
        raise ValueError(
            f"{source} returned shape {shape} but the batch holds {batch_size} instances; return one loss per instance."
        )
    return losses


@dataclass
class Passes:
    """The forwards of one step. ``forward()`` returns per-instance losses [B] at the current weights (the engine
    runs every backward); ``first_pass`` / ``second_pass`` replace a pass's forward + backward and return its mean
    loss (the callback runs Lightning's closure so); ``module`` is the model that ``m`` and the Gram weighting hook;
    ``head`` probes the top layers only; ``source`` names the forward in errors; ``select(rows)`` is the forward on
    the given rows of the batch."""

    forward: LossFn | None
    backend: Backend
    first_pass: Callable[[], Tensor] | None = None
    second_pass: Callable[[], Tensor] | None = None
    batch_size: int | None = None
    module: nn.Module | None = None
    head: HeadProbe | None = None
    source: str = "the closure"
    select: Callable[[Tensor], Any] | None = None  # per-instance losses of the given rows (ESAM's second pass)

    def losses(self, needed_for: str) -> Tensor:
        """Per-instance losses [B] at the current weights, checked, with grad."""
        if self.forward is None:
            raise ValueError(f"{needed_for} needs per-instance losses: define per_sample_loss.")
        with self.backend.forward_context():
            return check_per_sample_losses(self.forward(), self.source, self.batch_size)

    def outputs(self, needed_for: str) -> tuple[Tensor, Tensor]:
        """(per-instance losses [B], the model's outputs [B, ...]) at the current weights: the forward's pair."""
        if self.forward is None:
            raise ValueError(
                f"{needed_for} needs the model's outputs: define per_sample_loss returning (losses, outputs)."
            )
        with self.backend.forward_context():
            pair = self.forward()
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], Tensor)):
            raise TypeError(
                f"{needed_for} adds a term from the model's outputs: {self.source} must return the pair (per-instance "
                f"losses [B], outputs [B, C]), e.g. `return F.cross_entropy(logits, y, reduction='none'), logits`; "
                f"got {type(pair).__name__}."
            )
        losses = check_per_sample_losses(pair[0], self.source, self.batch_size)
        if pair[1].dim() == 0 or pair[1].shape[0] != losses.shape[0]:
            raise ValueError(
                f"{self.source}: the outputs, shape {tuple(pair[1].shape)}, must hold one row per instance."
            )
        return losses, pair[1]

    def descent(self, term: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        """Forward + backward of the mean loss at the current weights (plus ``term(outputs)``, when given, from the
        forward's outputs): (mean loss, per-instance losses or None)."""
        if self.second_pass is not None:
            return self.second_pass().detach(), None
        if term is not None:
            losses, outputs = self.outputs("the step")
            self.backend.backward(losses.mean() + term(outputs))
        else:
            losses = self.losses("the step")
            self.backend.backward(losses.mean())
        return losses.detach().mean(), losses.detach()


@dataclass
class Pending:
    """What :meth:`SAMEngine.first_step` leaves for :meth:`SAMEngine.second_step`."""

    stats: StepStats
    snapshot: Snapshot | None  # None: nothing was perturbed (rho = 0, a step the rule does not perturb, or a skip)
    skip: bool = False
    plain: bool = False  # the step does not perturb: the caller's second gradient is at w


def backward_closure_error(loss: Any) -> ValueError:
    """A closure taken as a backward closure (a gradient was left in ``.grad``) that ran no backward."""
    per_instance = isinstance(loss, Tensor) and loss.dim() >= 1 and loss.numel() > 1
    returned = f"returned per-instance losses of shape {tuple(loss.shape)} and " if per_instance else ""
    return ValueError(
        "step(closure): .grad held a gradient from a backward before step(closure), so the closure was "
        "taken as a backward closure (davda54/sam: it runs forward and backward at w + eps and returns "
        f"the loss), but it {returned}ran no backward. For per-instance losses call zero_grad() before "
        "step(closure) (the optimizer then runs every backward); for a backward closure call "
        "loss.backward() inside it. w was restored and no step was taken."
    )


TWO_STEP_ERRORS = {
    "twice": "first_step() was called twice in a row: call second_step() (it restores w and steps) before the next "
    "first_step().",
    "no first": "second_step() needs a first_step() before it (first_step perturbs w, second_step restores it).",
    "no gradient": "second_step() found no gradient in .grad: first_step() took the gradient at w, so run the forward "
    "and backward at w + eps between first_step() and second_step(). w was restored and no step was taken.",
}


def two_step_error(case: str) -> RuntimeError:
    """The two-step API used out of order (``case``: a key of :data:`TWO_STEP_ERRORS`)."""
    return RuntimeError(TWO_STEP_ERRORS[case])
