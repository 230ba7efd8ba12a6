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

from ..config import Verify
from .base import Call, Kind, UnsupportedModuleError
from .batchnorm import BatchNormKind
from .checks import check_grads, check_rows, check_uses
from .compiled import check_eager, check_not_compiled
from .conv import Conv2dKind
from .embedding import EmbeddingKind
from .linear import LinearKind
from .norm import BATCH_NORMS, NormKind
from .terms import Term

KINDS: tuple[type[Kind], ...] = (LinearKind, EmbeddingKind, NormKind, Conv2dKind, BatchNormKind)
SUPPORTED_TEXT = (
    "Linear, transformers' Conv1D, Embedding (and verified scaled lookups), LayerNorm, RMSNorm (torch's and "
    "transformers'), Conv2d (groups=1), BatchNorm in eval mode"
)


_ROW_KINDS = (LinearKind, NormKind)  # per-row kinds whose 2-D input may be rows flattened to [B k, d] (OPT)


class _Rerun(Exception):
    """The forward ran before B was known and a shared call (leading size 1) was not expanded: run it again."""


class _Record:
    """A call as recorded in the forward: the layer, the raw input and output, and whether it was broadcast."""

    def __init__(self, kind: Kind, inputs: tuple, x: Tensor, out: Tensor, expanded: int | None) -> None:
        self.kind, self.x, self.expanded = kind, x, expanded
        self.out: Tensor | None = out  # in the graph until the backward has read its gradient
        self.dtype = out.dtype
        self.stops = {t.grad_fn for t in inputs if isinstance(t, Tensor) and t.grad_fn is not None}
        self.versions = (x._version, out._version)
        self.call: Call | None = None
        self.rows: int | None = None  # flattened [B * k, d] rows: k


def _shared(kind: Kind, x: Tensor, bsz: int | None) -> bool:
    """A call read by every instance alike: leading size 1, or 1-D indices of an Embedding that are not B long."""
    if x.dim() == 0:
        return True
    if isinstance(kind, EmbeddingKind) and x.dim() == 1:
        return bsz is None or x.shape[0] != bsz
    return x.shape[0] == 1 and bsz != 1


def _broadcast(kind: Kind, x: Tensor, out: Tensor, bsz: int) -> tuple[Tensor, Tensor]:
    if isinstance(kind, EmbeddingKind) and x.dim() == 1:
        x, out = x.unsqueeze(0), out.unsqueeze(0)
    if x.dim() == 0:
        x, out = x.reshape(1, 1), out.unsqueeze(0)
    return x.expand(bsz, *x.shape[1:]), out.expand(bsz, *out.shape[1:])


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
            raise UnsupportedModuleError(_checkpointing_message(who, way_out))
        wanted = {id(p) for p in params}
        self.owners: dict[int, list[Kind]] = {}
        self.kinds: list[Kind] = []
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
            self.kinds.append(kind)
            for p in own.values():
                self.owners.setdefault(id(p), []).append(kind)
        missing = wanted - set(self.owners)
        if missing:
            raise UnsupportedModuleError(
                f"{len(missing)} trainable parameter(s) are not owned by a submodule of {type(module).__name__}: "
                f"{who} needs every optimized parameter inside the module it hooks."
            )
        self.params = {id(p): p for p in params if id(p) in self.owners}
        self.batch_norms = [
            (n or type(module).__name__, s) for n, s in module.named_modules() if isinstance(s, BATCH_NORMS)
        ]
        self.names: dict[int, str] = {}
        for kind in self.kinds:
            for role, p in kind.params.items():
                self.names.setdefault(id(p), f"{kind.name}.{role}")
        self.tied = {pid for pid, kinds in self.owners.items() if len(kinds) > 1}
        self.records: list[_Record] = []
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
            if _shared(kind, x, hint) and hint is not None and hint > 1:
                x, replaced = _broadcast(kind, x, out, hint)
                expanded = hint
            self.records.append(_Record(kind, inputs, x.detach(), replaced if replaced is not None else out, expanded))
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
            except _Rerun:
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
        self._interpret(bsz)
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
                raise UnsupportedModuleError(_checkpointing_message(self.who, self.way_out)) from err
            raise
        storages: set[int] = set()
        for r, g in zip(self.records, grads):
            b = None if g is None else (g.float() / scale if scale != 1.0 else g)  # unscaled in float32
            if b is not None:  # autograd hands one tensor to both inputs of an add: each call owns its own
                ptr = b.untyped_storage().data_ptr()
                b = b.clone() if ptr in storages else b
                storages.add(ptr)
            assert r.call is not None
            r.call.b = None if b is None else b.reshape(r.call.shape)
        if rows_due:
            check_rows(self, losses, scale)
            self._seen.add(signature)
        if grads_due:
            check_grads(self, losses, scale)
        self._steps += 1
        for r in self.records:
            r.out = None  # the outputs and the graph can go

    def _interpret(self, bsz: int) -> None:
        """Each call as [B, ...] rows: batch-first, broadcast (expanded in the forward), or flattened [B k, d] rows."""
        for r in self.records:
            x, out = r.x, r.out
            assert out is not None
            if r.expanded is not None:
                if r.expanded != bsz:
                    raise _Rerun
            elif _shared(r.kind, x, bsz) and bsz > 1:
                raise _Rerun
            elif x.dim() == 0 or x.shape[0] != bsz:
                lead = x.shape[0] if x.dim() else 0
                if isinstance(r.kind, _ROW_KINDS) and x.dim() == 2 and lead % bsz == 0 and out.shape[0] == lead:
                    r.rows = lead // bsz  # [B k, d] rows, instance-major: mapped back, then checked like any call
                    x, out = x.reshape(bsz, r.rows, x.shape[-1]), out.reshape(bsz, r.rows, out.shape[-1])
                else:
                    raise UnsupportedModuleError(
                        f"{r.kind.name} ({type(r.kind.module).__name__}) was called on an input of shape "
                        f"{tuple(r.x.shape)} in a batch of {bsz} (the number of per-instance losses): its rows are not "
                        "the batch's instances (a table computed once for the whole batch, such as a relative-position "
                        f"bias). {self.who} needs batch-first calls or a leading size of 1. Freeze "
                        f"{', '.join(self.names[id(p)] for p in r.kind.params.values())} (requires_grad=False), or "
                        f"{self.way_out}."
                    )
            elif isinstance(r.kind, EmbeddingKind) and x.dim() == 1:
                x = x.unsqueeze(1)  # a batch of single tokens
            r.call = Call(x, tuple(out.shape))

    def batch_view(self, kind: Kind, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...] | None]:
        """A second-pass call as [B, ...] rows, read as the first pass read it: (x, out, the shape to give the
        corrected output back in, or None to return it as [B, ...], a broadcast call made per-instance)."""
        bsz = self.batch_size
        assert bsz is not None
        if _shared(kind, x, bsz) and bsz > 1:
            x, out = _broadcast(kind, x, out, bsz)
            return x, out, None
        if x.dim() > 0 and x.shape[0] == bsz:
            return (x.unsqueeze(1) if isinstance(kind, EmbeddingKind) and x.dim() == 1 else x), out, tuple(out.shape)
        lead = x.shape[0] if x.dim() else 0
        if isinstance(kind, _ROW_KINDS) and x.dim() == 2 and lead % bsz == 0:
            k = lead // bsz
            return x.reshape(bsz, k, x.shape[-1]), out.reshape(bsz, k, out.shape[-1]), tuple(out.shape)
        raise ValueError(
            f"{kind.name} ({type(kind.module).__name__}) was called on an input of shape {tuple(x.shape)} in the second "
            f"pass of a batch of {bsz}: {self.who} needs the same batch-first calls in both passes."
        )

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


def _checkpointing_message(who: str, way_out: str) -> str:
    return (
        f"{who} cannot run with reentrant gradient checkpointing (torch.utils.checkpoint(use_reentrant=True), "
        "transformers' gradient_checkpointing_enable()): the layers' outputs are not in the graph it reads. Use "
        "use_reentrant=False, turn it off (model.gradient_checkpointing_disable()), or "
        f"{way_out}."
    )
