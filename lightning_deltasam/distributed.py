"""Collective operations the step needs, behind one small interface (identity on one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class Reducer:
    """Single-process reducer: every collective is the identity. ``world_size`` is 1."""

    world_size: int = 1
    rank: int = 0

    def sum_(self, tensor: Tensor) -> Tensor:
        return tensor

    def max_(self, tensor: Tensor) -> Tensor:
        return tensor

    def sum_coalesced_(self, tensors: list[Tensor]) -> None:
        """Sum a list of tensors across ranks in place (no-op here)."""

    def gather_cat(self, tensor: Tensor, dim: int = -1) -> tuple[Tensor, int]:
        """Concatenate every rank's ``tensor`` along ``dim``; returns it and this rank's offset."""
        return tensor, 0


class DistributedReducer(Reducer):
    """Reducer over an initialized ``torch.distributed`` process group."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def sum_(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def max_(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def sum_coalesced_(self, tensors: list[Tensor]) -> None:
        # One flat buffer per dtype: one collective instead of one per parameter.
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = _flatten_dense_tensors(group)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            for t, synced in zip(group, _unflatten_dense_tensors(flat, group)):
                t.copy_(synced)

    def gather_cat(self, tensor: Tensor, dim: int = -1) -> tuple[Tensor, int]:
        dim = dim % tensor.dim()
        sizes = torch.tensor([tensor.shape[dim]], device=tensor.device, dtype=torch.long)
        all_sizes = [torch.zeros_like(sizes) for _ in range(self.world_size)]
        dist.all_gather(all_sizes, sizes, group=self.group)
        counts = [int(s.item()) for s in all_sizes]
        longest = max(counts)
        pad = list(tensor.shape)
        pad[dim] = longest - tensor.shape[dim]
        padded = torch.cat([tensor, tensor.new_zeros(pad)], dim=dim) if pad[dim] else tensor.contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        parts = [p.narrow(dim, 0, c) for p, c in zip(parts, counts)]
        return torch.cat(parts, dim=dim), sum(counts[: self.rank])


def default_reducer(sync: str) -> Reducer:
    """The reducer for ``sync``: global collectives when a process group of >1 ranks is up."""
    if sync == "global" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistributedReducer()
    return Reducer()
