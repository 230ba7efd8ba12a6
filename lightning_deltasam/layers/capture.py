"""The first pass both per-instance users share (the exact Gram rule, the per-instance route of ``m``): hooks on every
layer holding a trainable parameter, one backward to the layers' outputs, and the checks that make a wrong
per-instance gradient an error, never a silently different step:

- B is the number of per-instance losses, never guessed from a hooked call;
- every use of a trainable parameter in the autograd graph lies inside a recorded call of a layer that holds it
  (a weight read outside its module's forward, as ``F.linear(h, emb.weight)``, is refused by name), every step;
- on each new shape signature, every call's rows are shown to be the batch's instances (a backward of randomly
  weighted losses must scale each row's output gradient by its instance's weight): a table computed once for the
  batch whose first size happens to equal B (positions ``arange(T)``, a [T, T] bias at T == B) is refused;
- on the first step (``verify="always"``: every step), two instances' per-instance gradients are compared with
  autograd's, parameter by parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..options import Verify
from .base import Kind, UnsupportedModuleError
from .checks import check_grads, check_rows, check_uses
from .compiled import check_eager, check_not_compiled
from .kinds import checkpointing_message, owned_kinds
from .norm import BATCH_NORMS
from .rows import Record, Rerun, batch_view, broadcast, give_grads, interpret, shared
from .terms import Term


class LayerCapture:
    """Every trainable layer of ``module`` as a :class:`~.base.Kind`, the recorded calls of one forward and their
    output gradients, turned into per-group gradient terms.

    Args:
        module: the module whose forward computes the losses (its submodules are hooked).
        params: the trainable parameters covered (the optimizer's); others count as frozen.
        who, way_out: who hooks the layers and the alternative, for the errors.
        verify: ``"auto"`` (rows checked on each new shape signature, gradients on the first step), ``"always"``,
            or ``"off"``.
    """

    def __init__(self, module: nn.Module, params: Sequence[Tensor], who: str, way_out: str, verify: Verify = "auto"):
        self.who, self.way_out, self.verify = who, way_out, verify
        check_not_compiled(module, who, way_out)
        if getattr(module, "is_gradient_checkpointing", False):
            raise UnsupportedModuleError(checkpointing_message(who, way_out))
        self.kinds, self.owners = owned_kinds(module, params, who, way_out)
        self.params = {id(p): p for p in params if id(p) in self.owners}
        self.batch_norms = [
            (n or type(module).__name__, s) for n, s in module.named_modules() if isinstance(s, BATCH_NORMS)
        ]
        self.names: dict[int, str] = {}
        for kind in self.kinds:
            for role, p in kind.params.items():
                self.names.setdefault(id(p), f"{kind.name}.{role}")
        self.tied = {pid for pid, kinds in self.owners.items() if len(kinds) > 1}
        self.records: list[Record] = []
        self.batch_size: int | None = None
        self._hint: int | None = None
        self._recording = False
        self._seen: set[tuple] = set()
        self._steps = 0
        self._terms: dict[tuple[int, bool], dict[int, list[Term]]] = {}

    # ---------------------------------------------------------------- forward
    @contextmanager
    def record(self, batch_size: int | None = None) -> Iterator[LayerCapture]:
        """Hooks that keep each layer call's input and output while the losses are computed. ``batch_size``: B if
        known (else the last step's, checked against the losses afterwards)."""
        self.clear()
        for name, norm in self.batch_norms:
            if norm.training or norm.running_mean is None:
                raise UnsupportedModuleError(
                    f"{name} ({type(norm).__name__}) normalizes with the batch's own statistics (training mode), so each "
                    f"instance's loss depends on the others and has no gradient of its own: {self.who} cannot run. Put "
                    f"the batch norms in eval mode (running statistics), or {self.way_out}."
                )
        self._hint = batch_size if batch_size is not None else self._hint
        handles = [h for k in self.kinds for h in k.register(self._hook(k))]
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False
            for h in handles:
                h.remove()

    def _hook(self, kind: Kind) -> Callable:
        def hook(module: nn.Module, inputs: tuple, out: Tensor) -> Tensor | None:
            if not self._recording or not torch.is_grad_enabled() or kind.busy:
                return None
            check_eager(self.who, self.way_out)
            x = kind.input_of(inputs)
            if not isinstance(x, Tensor) or not isinstance(out, Tensor):
                raise UnsupportedModuleError(
                    f"{kind.name} was called without a tensor input and output: {self.who} cannot read it."
                )
            hint, expanded, replaced = self._hint, None, None
            if shared(kind, x, hint) and hint is not None and hint > 1:
                x, replaced = broadcast(kind, x, out, hint)
                expanded = hint
            self.records.append(Record(kind, inputs, x.detach(), replaced if replaced is not None else out, expanded))
            return replaced

        return hook

    def first_pass(self, run: Callable[[], Tensor], batch_size: int | None, scale: float = 1.0) -> Tensor:
        """``run()`` (per-instance losses) under the hooks, then :meth:`backward`; the forward is run again when B
        was not known beforehand and a call shared by the batch needs expanding to it."""
        known = batch_size
        for attempt in range(3):
            try:
                with self.record(known):
                    losses = run()
            except Exception as err:
                expanded = sorted({r.kind.name for r in self.records if r.expanded is not None})
                if not expanded:
                    raise
                if attempt == 0 and batch_size is None:
                    known = self._hint = None  # the last step's B may not be this batch's: learn B first
                    continue
                raise UnsupportedModuleError(
                    f"the forward failed once the calls of {', '.join(expanded)} (leading size 1, read as shared by the "
                    f"batch) were expanded to the batch's {known} rows so that each instance gets its own gradient "
                    f"({type(err).__name__}: {err}). {self.who} cannot read them; freeze their parameters "
                    f"(requires_grad=False), or {self.way_out}."
                ) from err
            try:
                self.backward(losses, scale)
                return losses
            except Rerun:
                known = self.batch_size
                del losses  # this forward's graph goes before the next one is built
        raise RuntimeError("unreachable")

    # --------------------------------------------------------------- backward
    def backward(self, losses: Tensor, scale: float = 1.0) -> None:
        """Output gradients of every recorded call from one backward of ``scale * sum(losses)`` (no parameter
        gradient), after the checks; ``scale`` (a GradScaler's) is divided out."""
        if not self.records:
            raise RuntimeError(f"{self.who} recorded no layer call: was the loss computed inside record()?")
        bsz = self.batch_size = self._hint = int(losses.numel())
        interpret(self.records, bsz, self.names, self.who, self.way_out)
        for r in self.records:
            assert r.out is not None
            if (r.x._version, r.out._version) != r.versions:
                raise RuntimeError(
                    f"the input or output of {r.kind.name} was modified in place after its forward: {self.who} "
                    f"cannot read its gradient; avoid the in-place op or {self.way_out}."
                )
        check_uses(self, losses)
        signature = (bsz, *((id(r.kind), tuple(r.x.shape), r.rows) for r in self.records))
        rows_due = self.verify == "always" or (self.verify == "auto" and signature not in self._seen)
        grads_due = self.verify == "always" or (self.verify == "auto" and self._steps == 0)
        total = losses.sum() * scale if scale != 1.0 else losses.sum()
        try:
            grads = torch.autograd.grad(total, self.outputs(), allow_unused=True, retain_graph=rows_due or grads_due)
        except RuntimeError as err:
            if "checkpoint" in str(err):  # torch's reentrant checkpoint refuses .grad()
                raise UnsupportedModuleError(checkpointing_message(self.who, self.way_out)) from err
            raise
        give_grads(self.records, grads, scale)
        if rows_due:
            check_rows(self, losses, scale)
            self._seen.add(signature)
        if grads_due:
            check_grads(self, losses, scale)
        self._steps += 1
        for r in self.records:
            r.out = None  # the outputs and the graph can go

    def batch_view(self, kind: Kind, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...] | None]:
        """A second-pass call as [B, ...] rows, read as the first pass read it: (x, out, the shape to give the
        corrected output back in, or None to return it as [B, ...], a broadcast call made per-instance)."""
        assert self.batch_size is not None
        return batch_view(kind, x, out, self.batch_size, self.who)

    # ------------------------------------------------------------------ terms
    def terms(self, m: int, dense: bool = False, consume: bool = False) -> dict[int, list[Term]]:
        """{id(param): its terms} for groups of ``m`` consecutive instances (formed once per m and forward);
        ``dense``: a Linear's G_g may be formed as a matrix where that costs fewer FLOPs (not for tied weights);
        ``consume``: each layer's recorded inputs and output gradients are dropped once its terms are formed (the
        memory peak is then one layer's, not every layer's; no other terms can be formed from this forward)."""
        if (m, dense) not in self._terms:
            bsz = self.batch_size
            assert bsz is not None
            out: dict[int, list[Term]] = {}
            for kind in self.kinds:
                calls = [r.call for r in self.records if r.kind is kind and r.call is not None and r.call.b is not None]
                if not calls:
                    continue
                tied = any(id(p) in self.tied for p in kind.params.values())
                for p, term in kind.terms(calls, bsz, m, dense and not tied):
                    out.setdefault(id(p), []).append(term)
                if consume:
                    for r in self.records:
                        if r.kind is kind:
                            r.x, r.call = None, None  # type: ignore[assignment]
            self._terms[(m, dense)] = out
        return self._terms[(m, dense)]

    def outputs(self) -> list[Tensor]:
        """The recorded calls' outputs, in the graph (before the first backward has read them)."""
        outs = [r.out for r in self.records]
        assert all(o is not None for o in outs), "the outputs were released by the first backward"
        return outs  # type: ignore[return-value]

    def release(self) -> None:
        """Drop the recorded calls and the cached terms (a caller keeps the terms it still needs); B stays known."""
        self.records = []
        self._terms = {}

    def clear(self) -> None:
        self.release()
        self.batch_size = None
