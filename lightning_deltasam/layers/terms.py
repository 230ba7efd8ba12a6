"""Per-instance (or per-group) gradients of one parameter in factored form, and the algebra both per-instance users
need: inner products (norms, the Gram matrix), weighted sums, and a perturbation's effect on a layer's output.

A parameter is viewed as a matrix [R, C] (a vector as [1, F], a convolution kernel as [out, in * kh * kw]). Each
layer kind states its share of group g's gradient G_g as one of three terms; a parameter used by several layers
(tied weights) has several terms, summed:

- :class:`LowRank`: G_g = sum_n left[g, n] (x) right[g, n] (a Linear weight: output gradient (x) input, per token);
- :class:`Rows`: G_g = sum_n e_{index[g, n]} (x) right[g, n] (an Embedding: the looked-up rows only, never V x d);
- :class:`Full`: G_g itself, [G, R, C] (norm weights, biases, a Linear weight when that is cheaper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LowRank:
    left: Tensor  # [G, N, R]
    right: Tensor  # [G, N, C]
    grad_left: bool = True  # which side is the output gradient (the capture's own tensor); the other is the input

    def scale_(self, c: Tensor) -> LowRank:
        """Times c_g, in place, on the output-gradient side only: the input side may be the caller's tensor, and
        stays shared by the layers that read it (query, key, value)."""
        side = self.left if self.grad_left else self.right
        side.mul_(c.view(-1, 1, 1).to(side.dtype))
        return self


@dataclass
class Rows:
    index: Tensor  # [G, N] row indices
    right: Tensor  # [G, N, C]
    rows: int  # R

    def scale_(self, c: Tensor) -> Rows:
        self.right.mul_(c.view(-1, 1, 1).to(self.right.dtype))
        return self


@dataclass
class Full:
    value: Tensor  # [G, R, C]

    def scale_(self, c: Tensor) -> Full:
        self.value.mul_(c.view(-1, 1, 1).to(self.value.dtype))
        return self


Term = LowRank | Rows | Full


def as_matrix(p: Tensor) -> tuple[int, int]:
    """The [R, C] view of a parameter's shape that its terms use."""
    return (1, p.numel()) if p.dim() < 2 else (p.shape[0], p.numel() // p.shape[0])


def _gather_rows(left: Tensor, index: Tensor) -> Tensor:
    """left[g, n, index[g, n']] as [G, N, N']: a LowRank factor read at the rows a Rows term touches."""
    return torch.gather(left, 2, index.unsqueeze(1).expand(-1, left.shape[1], -1))


def _token_pairs(t: Term, u: Term) -> Tensor:
    """[G, N_t, N_u]: the products whose sum over both token axes is <t_g, u_g> (token terms only)."""
    if isinstance(t, Rows) and isinstance(u, LowRank):
        return _token_pairs(u, t).transpose(1, 2)
    right = torch.bmm(t.right, u.right.transpose(1, 2))  # type: ignore[union-attr]
    if isinstance(t, LowRank) and isinstance(u, LowRank):
        return torch.bmm(t.left, u.left.transpose(1, 2)) * right
    if isinstance(t, Rows) and isinstance(u, Rows):
        return (t.index.unsqueeze(2) == u.index.unsqueeze(1)).to(right.dtype) * right
    assert isinstance(t, LowRank) and isinstance(u, Rows)
    return _gather_rows(t.left, u.index).to(right.dtype) * right


def _full_dot(v: Tensor, u: Term) -> Tensor:
    """[G, N_u]: <V_g, each token of u in group g> for a Full value V [G, R, C]."""
    if isinstance(u, LowRank):
        return (torch.bmm(u.left, v.to(u.left.dtype)) * u.right).sum(-1)
    assert isinstance(u, Rows)
    picked = torch.gather(v, 1, u.index.unsqueeze(-1).expand(-1, -1, v.shape[-1]))
    return (picked.to(u.right.dtype) * u.right).sum(-1)


def pair_sum(t: Term, u: Term) -> Tensor:
    """[G]: <t_g, u_g> for every group, never forming G_g of a token term."""
    if isinstance(t, Full) and isinstance(u, Full):
        return (t.value * u.value.to(t.value.dtype)).sum((1, 2))
    if isinstance(u, Full):
        t, u = u, t
    if isinstance(t, Full):
        return _full_dot(t.value, u).sum(1)
    return _token_pairs(t, u).sum((1, 2))


def _flat(t: Term) -> Term:
    """All groups' tokens as one group (for inner products across groups)."""
    if isinstance(t, LowRank):
        return LowRank(t.left.flatten(0, 1).unsqueeze(0), t.right.flatten(0, 1).unsqueeze(0))
    if isinstance(t, Rows):
        return Rows(t.index.flatten().unsqueeze(0), t.right.flatten(0, 1).unsqueeze(0), t.rows)
    return t


def gram_pair(t: Term, u: Term) -> Tensor:
    """[B, B]: <t_i, u_j> across instances (the terms of m = 1, one group per instance)."""
    if isinstance(t, Full) and isinstance(u, Full):
        return t.value.flatten(1) @ u.value.to(t.value.dtype).flatten(1).t()
    if isinstance(t, Full) != isinstance(u, Full):
        full, other = (t, u) if isinstance(t, Full) else (u, t)
        bsz, n = other.right.shape[:2]  # type: ignore[union-attr]
        flat = _flat(other)
        # <V_i, token n of instance j>, summed over j's tokens
        dots = torch.stack([_full_dot(full.value[i : i + 1], flat)[0] for i in range(bsz)])  # type: ignore[union-attr]
        k = dots.view(bsz, bsz, n).sum(-1)
        return k if isinstance(t, Full) else k.t()
    bsz, n_t = t.right.shape[:2]  # type: ignore[union-attr]
    n_u = u.right.shape[1]  # type: ignore[union-attr]
    pairs = _token_pairs(_flat(t), _flat(u))[0]
    return pairs.view(bsz, n_t, bsz, n_u).sum((1, 3))


def materialize(t: Term, shape: tuple[int, int], weights: Tensor | None = None) -> Tensor:
    """sum_g weights_g G_g as an [R, C] matrix (all ones without ``weights``)."""
    if isinstance(t, Full):
        v = t.value if weights is None else t.value * weights.view(-1, 1, 1).to(t.value.dtype)
        return v.sum(0).reshape(shape)
    right = t.right if weights is None else t.right * weights.view(-1, 1, 1).to(t.right.dtype)
    right = right.flatten(0, 1)
    if isinstance(t, LowRank):
        return t.left.flatten(0, 1).to(right.dtype).t() @ right
    out = torch.zeros(shape, dtype=right.dtype, device=right.device)
    return out.index_add_(0, t.index.flatten(), right)


def sum_norm_sq(terms: list[Term], shape: tuple[int, int]) -> Tensor:
    """||sum_g (sum of terms)_g||^2 in float64: Embedding rows over the distinct tokens only (never V x d)."""
    if all(isinstance(t, Rows) for t in terms):
        index = torch.cat([t.index.flatten() for t in terms])  # type: ignore[union-attr]
        right = torch.cat([t.right.flatten(0, 1) for t in terms])  # type: ignore[union-attr]
        uniq, inverse = torch.unique(index, return_inverse=True)
        rows = torch.zeros(uniq.numel(), right.shape[-1], dtype=right.dtype, device=right.device)
        total = rows.index_add_(0, inverse, right)
    else:
        total = sum(materialize(t, shape) for t in terms)  # type: ignore[assignment]
    return torch.linalg.vector_norm(total, dtype=torch.float64).square()


def matmul_delta(t: Term, x: Tensor, contract: int, cache: dict | None = None) -> Tensor:
    """[G, M, out]: x (grouped [G, M, K]) times the perturbation, for a layer y = x W^T (``contract=1``: x meets W's
    columns) or y = x W (``contract=0``: x meets W's rows, transformers' Conv1D)."""
    if isinstance(t, Full):
        v = t.value.to(x.dtype)
        return torch.bmm(x, v.transpose(1, 2) if contract == 1 else v)
    if isinstance(t, LowRank):
        meet, out = (t.right, t.left) if contract == 1 else (t.left, t.right)
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version, meet.data_ptr(), tuple(meet.shape))
        hit = cache.get(key) if cache is not None else None
        if hit is None:  # x meet^T, shared by layers reading one input (query, key, value)
            hit = (x, meet, torch.bmm(x, meet.to(x.dtype).transpose(1, 2)))
            if cache is not None:
                cache[key] = hit
        return torch.bmm(hit[2], out.to(x.dtype))
    if contract == 1:
        s = torch.bmm(x, t.right.to(x.dtype).transpose(1, 2))  # [G, M, N]
        out_ = x.new_zeros(x.shape[0], x.shape[1], t.rows)
        return out_.scatter_add_(2, t.index.unsqueeze(1).expand(-1, x.shape[1], -1), s)
    picked = torch.gather(x, 2, t.index.unsqueeze(1).expand(-1, x.shape[1], -1))
    return torch.bmm(picked, t.right.to(x.dtype))


def lookup_delta(t: Term, idx: Tensor) -> Tensor:
    """[G, M, C]: the perturbation's rows at the looked-up indices ``idx`` [G, M] (an Embedding's use)."""
    if isinstance(t, Full):
        return torch.gather(t.value, 1, idx.unsqueeze(-1).expand(-1, -1, t.value.shape[-1]))
    if isinstance(t, LowRank):
        return torch.bmm(_gather_rows(t.left, idx).transpose(1, 2).to(t.right.dtype), t.right)
    same = (idx.unsqueeze(2) == t.index.unsqueeze(1)).to(t.right.dtype)
    return torch.bmm(same, t.right)
