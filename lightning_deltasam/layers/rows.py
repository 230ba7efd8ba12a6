"""How a recorded layer call's rows are read as the batch's instances: batch-first, broadcast, or flattened rows."""

from __future__ import annotations

from torch import Tensor

from .base import Call, Kind, UnsupportedModuleError
from .embedding import EmbeddingKind
from .linear import LinearKind
from .norm import NormKind

ROW_KINDS = (LinearKind, NormKind)  # per-row kinds whose 2-D input may be rows flattened to [B k, d] (OPT)


class Rerun(Exception):
    """The forward ran before B was known and a shared call (leading size 1) was not expanded: run it again."""


class Record:
    """A call as recorded in the forward: the layer, the raw input and output, and whether it was broadcast."""

    def __init__(self, kind: Kind, inputs: tuple, x: Tensor, out: Tensor, expanded: int | None) -> None:
        self.kind, self.x, self.expanded = kind, x, expanded
        self.out: Tensor | None = out  # in the graph until the backward has read its gradient
        self.dtype = out.dtype
        self.stops = {t.grad_fn for t in inputs if isinstance(t, Tensor) and t.grad_fn is not None}
        self.versions = (x._version, out._version)
        self.call: Call | None = None
        self.rows: int | None = None  # flattened [B * k, d] rows: k


def shared(kind: Kind, x: Tensor, bsz: int | None) -> bool:
    """A call read by every instance alike: leading size 1, or 1-D indices of an Embedding that are not B long."""
    if x.dim() == 0:
        return True
    if isinstance(kind, EmbeddingKind) and x.dim() == 1:
        return bsz is None or x.shape[0] != bsz
    return x.shape[0] == 1 and bsz != 1


def broadcast(kind: Kind, x: Tensor, out: Tensor, bsz: int) -> tuple[Tensor, Tensor]:
    if isinstance(kind, EmbeddingKind) and x.dim() == 1:
        x, out = x.unsqueeze(0), out.unsqueeze(0)
    if x.dim() == 0:
        x, out = x.reshape(1, 1), out.unsqueeze(0)
    return x.expand(bsz, *x.shape[1:]), out.expand(bsz, *out.shape[1:])


def interpret(records: list[Record], bsz: int, names: dict[int, str], who: str, way_out: str) -> None:
    """Each call as [B, ...] rows: batch-first, broadcast (expanded in the forward), or flattened [B k, d] rows."""
    for r in records:
        x, out = r.x, r.out
        assert out is not None
        if r.expanded is not None:
            if r.expanded != bsz:
                raise Rerun
        elif shared(r.kind, x, bsz) and bsz > 1:
            raise Rerun
        elif x.dim() == 0 or x.shape[0] != bsz:
            lead = x.shape[0] if x.dim() else 0
            if isinstance(r.kind, ROW_KINDS) and x.dim() == 2 and lead % bsz == 0 and out.shape[0] == lead:
                r.rows = lead // bsz  # [B k, d] rows, instance-major: mapped back, then checked like any call
                x, out = x.reshape(bsz, r.rows, x.shape[-1]), out.reshape(bsz, r.rows, out.shape[-1])
            else:
                raise UnsupportedModuleError(
                    f"{r.kind.name} ({type(r.kind.module).__name__}) was called on an input of shape "
                    f"{tuple(r.x.shape)} in a batch of {bsz} (the number of per-instance losses): its rows are not "
                    "the batch's instances (a table computed once for the whole batch, such as a relative-position "
                    f"bias). {who} needs batch-first calls or a leading size of 1. Freeze "
                    f"{', '.join(names[id(p)] for p in r.kind.params.values())} (requires_grad=False), or "
                    f"{way_out}."
                )
        elif isinstance(r.kind, EmbeddingKind) and x.dim() == 1:
            x = x.unsqueeze(1)  # a batch of single tokens
        r.call = Call(x, tuple(out.shape))


def batch_view(kind: Kind, x: Tensor, out: Tensor, bsz: int, who: str) -> tuple[Tensor, Tensor, tuple[int, ...] | None]:
    """A second-pass call as [B, ...] rows, read as the first pass read it: (x, out, the shape to give the
    corrected output back in, or None to return it as [B, ...], a broadcast call made per-instance)."""
    if shared(kind, x, bsz) and bsz > 1:
        x, out = broadcast(kind, x, out, bsz)
        return x, out, None
    if x.dim() > 0 and x.shape[0] == bsz:
        return (x.unsqueeze(1) if isinstance(kind, EmbeddingKind) and x.dim() == 1 else x), out, tuple(out.shape)
    lead = x.shape[0] if x.dim() else 0
    if isinstance(kind, ROW_KINDS) and x.dim() == 2 and lead % bsz == 0:
        k = lead // bsz
        return x.reshape(bsz, k, x.shape[-1]), out.reshape(bsz, k, out.shape[-1]), tuple(out.shape)
    raise ValueError(
        f"{kind.name} ({type(kind.module).__name__}) was called on an input of shape {tuple(x.shape)} in the second "
        f"pass of a batch of {bsz}: {who} needs the same batch-first calls in both passes."
    )


def give_grads(records: list[Record], grads: tuple[Tensor | None, ...], scale: float) -> None:
    """Each call's output gradient ``b`` from the backward's, unscaled (in float32) and in the call's [B, ...] shape."""
    storages: set[int] = set()
    for r, g in zip(records, grads):
        b = None if g is None else (g.float() / scale if scale != 1.0 else g)  # unscaled in float32
        if b is not None:  # autograd hands one tensor to both inputs of an add: each call owns its own
            ptr = b.untyped_storage().data_ptr()
            b = b.clone() if ptr in storages else b
            storages.add(ptr)
        assert r.call is not None
        r.call.b = None if b is None else b.reshape(r.call.shape)
