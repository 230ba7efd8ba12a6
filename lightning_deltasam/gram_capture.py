"""The Gram matrix of per-instance gradients, K_ij = g_i . g_j, from one forward and one activation backward.

docs/algorithm.md, "The exact Gram matrix". The layer hooks of :class:`~.layers.LayerCapture` keep each trainable
layer's input ``a`` and, after one backward of sum_i l_i with respect to the layers' *outputs* (no parameter gradient
is formed), its output gradient ``b``. Each layer kind (:mod:`.layers`) turns them into every instance's share of its
parameters' gradients; K sums their inner products (a tied weight's cross terms included), and the perturbation
direction g_delta = sum_i delta_i g_i is book-kept from the same pieces (no second backward). Nothing of size B x P
is kept: one layer's per-instance gradients at most.

``mode="sketch"`` projects each Linear weight's per-instance gradient G_i to P^T G_i Q with seeded Gaussian P, Q of
rank r (unbiased: E<P^T G Q, P^T H Q> = <G, H>); every other parameter stays exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Literal

import torch
from torch import Tensor, nn

from .layers import LayerCapture, LowRank, Rows, Term, UnsupportedModuleError, Verify
from .layers.compiled import check_not_compiled, compiled_part
from .layers.terms import Full, as_matrix, gram_pair, materialize

GramMode = Literal["exact", "sketch"]
__all__ = ["GramCapture", "GramMode", "UnsupportedModuleError", "check_not_compiled", "compiled_part"]


class GramCapture:
    """Per-instance gradient Gram matrix and weighted gradients of ``module``'s layers holding ``params``.

    Usage (what the engine does in a step's first pass)::

        capture = GramCapture(module, params)
        losses = capture.first_pass(lambda: per_sample_loss(batch), batch_size=None)  # [B], hooks + backward
        K = capture.gram()                         # [B, B] float64
        grads = capture.weighted_grads(delta)      # {param: sum_i delta_i g_i}
        capture.clear()

    Args:
        module: the module whose forward computes the losses (its submodules are hooked).
        params: the trainable parameters K covers (the optimizer's); others count as frozen.
        mode: ``"exact"``, or ``"sketch"`` (Linear weights by rank-``rank`` Kronecker sketches).
        rank: the sketch rank r.
        generator: draws the sketch matrices (seeded identically on every rank); a fresh draw per step.
        verify: the capture's checks against autograd (:class:`~.layers.LayerCapture`).
    """

    def __init__(
        self,
        module: nn.Module,
        params: Sequence[Tensor],
        mode: GramMode = "exact",
        rank: int = 32,
        generator: torch.Generator | None = None,
        verify: Verify = "auto",
    ) -> None:
        if mode not in ("exact", "sketch"):
            raise ValueError(f"gram mode={mode!r} is not supported; use 'exact' or 'sketch'.")
        self.mode, self.rank, self.generator = mode, rank, generator
        self.capture = LayerCapture(
            module,
            params,
            "the exact Gram rule (reweight=GramWeights(...))",
            "use a probe rule (reweight=ProbeWeights(...))",
            verify,
        )

    def record(self, batch_size: int | None = None) -> AbstractContextManager[LayerCapture]:
        """Hooks that keep each layer call while the losses are computed (then :meth:`backward`)."""
        return self.capture.record(batch_size)

    def backward(self, losses: Tensor, scale: float = 1.0) -> None:
        """Output gradients of every recorded call, after the capture's checks; ``scale`` is divided out."""
        self.capture.backward(losses, scale)

    def first_pass(self, run: Callable[[], Tensor], batch_size: int | None, scale: float = 1.0) -> Tensor:
        """:meth:`record` + ``run()`` + :meth:`backward` (the forward run again if B was not known beforehand)."""
        return self.capture.first_pass(run, batch_size, scale)

    @property
    def batch_size(self) -> int | None:
        return self.capture.batch_size

    def gram(self) -> Tensor:
        """K [B, B] (float64) summed over every covered parameter."""
        bsz = self.capture.batch_size
        if bsz is None:
            raise RuntimeError("GramCapture.gram() before a recorded forward.")
        k = torch.zeros(bsz, bsz, dtype=torch.float64)
        cache: dict = {}
        for terms in self.capture.terms(1).values():
            if len(terms) == 1:
                part = self._gram_one(terms[0], cache)
            else:  # a tied weight: every pair of its uses, cross terms included
                part = torch.stack([gram_pair(t, u).double() for t in terms for u in terms]).sum(0)
            k = k.to(part.device) + part.double()
        return k

    def _gram_one(self, term: Term, cache: dict) -> Tensor:
        if isinstance(term, Full):
            flat = term.value.flatten(1)
            return flat @ flat.t()
        if isinstance(term, Rows):
            return _embedding_gram(term.index, term.right)
        if self.mode == "sketch" and min(term.left.shape[-1], term.right.shape[-1]) > self.rank:
            rows = self._sketch(term).flatten(1)
            return rows @ rows.t()
        return _linear_gram(term.right, term.left, cache=cache)

    def _sketch(self, term: LowRank) -> Tensor:
        """P^T G_i Q = sum_t (P^T left_it)(Q^T right_it)^T for every instance: [B, r, r], never G_i itself."""
        r, left, right = self.rank, term.left, term.right
        p = torch.randn(left.shape[-1], r, generator=self.generator, device=left.device, dtype=left.dtype) / r**0.5
        q = torch.randn(right.shape[-1], r, generator=self.generator, device=right.device, dtype=right.dtype) / r**0.5
        return torch.bmm((left @ p).transpose(1, 2), right @ q)

    def weighted_grads(self, delta: Tensor) -> dict[Tensor, Tensor]:
        """{parameter: sum_i delta_i g_i} from the kept pieces (no backward); unused parameters are absent."""
        out: dict[Tensor, Tensor] = {}
        for pid, terms in self.capture.terms(1).items():
            p = self.capture.params[pid]
            grad = sum(materialize(t, as_matrix(p), delta) for t in terms)
            out[p] = grad.reshape(p.shape).to(p.dtype)  # type: ignore[union-attr]
        return out

    def clear(self) -> None:
        self.capture.clear()


def _linear_gram(a: Tensor, b: Tensor, route: str = "auto", cache: dict | None = None) -> Tensor:
    """sum over tokens of a Linear weight's per-instance Gram, by the cheaper route for these sizes.

    Tokens whose output gradient is exactly zero (padding: masked keys, unpooled positions) add
    nothing and are dropped first (N' kept of N = B T).
    Materialized: G_i = b_i^T a_i (B x d_out x d_in), then G G^T: ~2N d_in d_out + 2B^2 d_in d_out FLOPs.
    Ghost: K_ij = sum_{t,t'} (a_it.a_jt')(b_it.b_jt'): ~2N'^2 (d_in + d_out) FLOPs, N'^2 memory.
    ``cache`` keeps a A^T per input tensor: layers reading one input (BERT's query, key, value) share it.
    """
    bsz, t, d_in = a.shape
    d_out = b.shape[-1]
    n = bsz * t
    fb = b.reshape(n, d_out)
    keep = fb.abs().amax(dim=1) != 0
    kept = int(keep.sum())
    materialized = 2 * n * d_in * d_out + 2 * bsz * bsz * d_in * d_out
    ghost = 2 * kept * kept * (d_in + d_out + 1)
    if route == "ghost" or (route == "auto" and ghost < materialized):
        idx = keep.nonzero().squeeze(1)
        fb = fb.index_select(0, idx)
        key = (a.data_ptr(), tuple(a.shape), tuple(a.stride()))
        hit = cache.get(key) if cache is not None else None
        if hit is not None and torch.equal(hit[0], idx):
            prod = hit[1] * (fb @ fb.t())
        else:
            fa = a.reshape(n, d_in).index_select(0, idx)
            gram_a = fa @ fa.t()
            if cache is not None:
                cache[key] = (idx, gram_a, a)  # a kept alive: its address cannot be reused by another input
            prod = gram_a * (fb @ fb.t())
        seg = idx // t
        rows = torch.zeros(bsz, kept, dtype=prod.dtype, device=prod.device).index_add_(0, seg, prod)
        return torch.zeros(bsz, bsz, dtype=prod.dtype, device=prod.device).index_add_(1, seg, rows)
    g = torch.bmm(b.transpose(1, 2), a).reshape(bsz, -1)
    return g @ g.t()


def _embedding_gram(idx: Tensor, b: Tensor) -> Tensor:
    """sum_{t,t'} [x_it = x_jt'] (b_it . b_jt') via the per-instance rows of the batch's distinct tokens.

    Builds B x U x d (U distinct tokens in the batch, U <= B T), never B x V x d.
    """
    bsz, t = idx.shape
    d = b.shape[-1]
    uniq, inv = torch.unique(idx.reshape(-1), return_inverse=True)
    rows = torch.zeros(bsz * uniq.numel(), d, dtype=b.dtype, device=b.device)
    inst = torch.arange(bsz, device=idx.device).repeat_interleave(t)
    rows.index_add_(0, inst * uniq.numel() + inv, b.reshape(-1, d))
    flat = rows.view(bsz, -1)
    return flat @ flat.t()
