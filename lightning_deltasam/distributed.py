"""Collective operations the step needs, behind one small interface (identity on one process), and how the
parameters are split over ranks (FSDP1, FSDP2: :class:`Shards`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

try:  # FSDP2's sharded tensor; absent from torch builds without torch.distributed
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - such builds have no sharding to find

    class DTensor:  # type: ignore[no-redef]
        """Stand-in: no tensor is an instance."""


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


# ------------------------------------------------------------------ sharded parameters (FSDP1, FSDP2)
def local_tensor(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds, sharing its storage: a DTensor's local shard (FSDP2), any other
    tensor itself (FSDP1's flat parameters and their views are local already)."""
    if isinstance(tensor, DTensor):
        with torch.no_grad():  # no autograd node: the very local tensor, not a differentiable copy
            return tensor.to_local()
    return tensor


def local_tensors(tensors: list[Tensor]) -> list[Tensor]:
    return [local_tensor(t) for t in tensors]


class Shards:
    """How the trainable parameters are split over ranks. ``kind`` is ``None`` (every rank holds whole tensors:
    one process, DDP), ``"fsdp2"`` (DTensors sharded by ``fully_shard``) or ``"fsdp1"`` (FSDP1's flat parameters,
    or with ``use_orig_params=True`` views into them). Under sharding a norm or inner product is the sum over
    ranks of local sums (:meth:`sum_`), and a backward's gradient is already the mean over ranks."""

    def __init__(
        self,
        kind: str | None = None,
        group: dist.ProcessGroup | None = None,
        flat: bool = False,
        device: torch.device | None = None,
    ) -> None:
        self.kind, self.group, self.flat = kind, group, flat
        self.device = device if device is not None else torch.device("cpu")  # where the collectives' tensors live
        self.world_size = dist.get_world_size(group) if kind is not None else 1
        self.rank = dist.get_rank(group) if kind is not None else 0

    @property
    def sharded(self) -> bool:
        return self.kind is not None

    @property
    def name(self) -> str:
        """The strategy in words, for messages."""
        if self.kind == "fsdp2":
            return "FSDP2 (fully_shard, Lightning's ModelParallelStrategy)"
        if self.kind == "fsdp1":
            return "FSDP1 (FullyShardedDataParallel, Lightning's strategy='fsdp')"
        return "unsharded parameters"

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` (local sums: squares, inner products) over the ranks that hold the shards, in place."""
        if self.kind is not None and self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor


def shards_of(params: list[Tensor]) -> Shards:
    """The :class:`Shards` of ``params`` (an optimizer's trainable parameters); refuses DeepSpeed's and mixed or
    multi-dimensional sharding with a message naming what works."""
    if any(hasattr(p, "ds_id") or hasattr(p, "ds_tensor") for p in params):
        raise ValueError(
            "DeepSpeed partitions the parameters (ZeRO) and steps the optimizer itself, without the closure SAM's "
            "second pass needs: lightning_deltasam does not support DeepSpeed. Use DDP (strategy='ddp'), FSDP2 "
            "(fully_shard, or Lightning's ModelParallelStrategy with configure_model) or FSDP1 "
            "(FullyShardedDataParallel, strategy='fsdp') instead."
        )
    dtensors = [p for p in params if isinstance(p, DTensor)]
    if dtensors:
        if len(dtensors) != len(params):
            raise ValueError(
                f"{len(dtensors)} of the {len(params)} trainable parameters are DTensors (fully_shard) and the others "
                "are not: their gradients would not be reduced over ranks. Apply fully_shard to the root module as "
                "well, so every trainable parameter is sharded."
            )
        meshes = {(p.device_mesh.device_type, tuple(p.device_mesh.mesh.flatten().tolist())) for p in dtensors}
        mesh = dtensors[0].device_mesh
        if len(meshes) > 1 or mesh.ndim != 1 or any(not p.placements[0].is_shard() for p in dtensors):
            raise ValueError(
                "The trainable DTensors are not sharded over one 1-D device mesh (HSDP, tensor parallelism or a "
                f"Replicate placement, e.g. {dtensors[0].placements}): lightning_deltasam supports FSDP2's plain "
                "fully_shard over one mesh dimension. Use fully_shard(module) with a 1-D mesh, or DDP."
            )
        return Shards("fsdp2", mesh.get_group(), device=dtensors[0].device)
    flattened = [p for p in params if getattr(p, "_fsdp_flattened", False)]
    if flattened:
        flat = any(getattr(p, "_is_flat_param", False) for p in flattened)  # FlatParameter's own mark
        return Shards("fsdp1", None, flat=flat, device=flattened[0].device)
    return Shards()


def norm_of(norms: list[Tensor], shards: Shards | None = None) -> float:
    """||(n_1, n_2, ...)||_2 of per-tensor norms as a Python float (one host sync); 0 for an empty list. Under
    sharding (``shards``) the n_i are of this rank's shards: the squares are summed over ranks in one all-reduce
    (every rank calls it, with or without tensors). In float64 where a norm is float64 (a float64 model's eps is
    exact to its precision), float32 otherwise."""
    if shards is not None and shards.sharded:
        device = norms[0].device if norms else torch.device("cpu")
        square = torch.stack([n.double() for n in norms]).square().sum() if norms else torch.zeros((), device=device)
        return float(shards.sum_(square.reshape(1).double()).sqrt())
    if not norms:
        return 0.0
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    return float(torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms])))


def checked_shards(params: list[Tensor], refusal: Callable[..., tuple[str, str] | None]) -> Shards:
    """:func:`shards_of` ``params``, refused (naming the strategy and what works instead) where ``refusal(flat=...)``
    says the step cannot be right sharded."""
    shards = shards_of(params)
    refused = refusal(flat=shards.flat) if shards.sharded else None
    if refused is not None:
        raise ValueError(f"{refused[0]}; it is not supported under {shards.name}. {refused[1]}.")
    return shards


def total_norm(tensors: list[Tensor], shards: Shards | None = None) -> Tensor:
    """||(t_1, t_2, ...)||_2 as a 0-dim tensor (no host sync unsharded; under ``shards``, over every rank's shard)."""
    if shards is not None and shards.sharded:
        return global_sums([[(t, t) for t in tensors]], shards)[0].sqrt()
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def global_sums(products: list[list[tuple[Tensor, Tensor]]], shards: Shards) -> Tensor:
    """[sum over k of a_k . b_k for each list of pairs], each inner product summed over every rank's shard: one
    all-reduce of this rank's local sums (every rank calls it, whatever its local tensors)."""
    zero = torch.zeros((), dtype=torch.float64, device=shards.device)
    local = [sum(((a.double() * b.double()).sum() for a, b in pairs), zero) for pairs in products]
    return shards.sum_(torch.stack(local))


def per_tensor_sums(
    params: list[Tensor], pairs: dict[Tensor, list[tuple[Tensor, Tensor]]], k: int, shards: Shards
) -> dict[int, Tensor]:
    """id(p) -> the k inner products of ``pairs[p]``, each summed over every rank's shard in one all-reduce (zeros
    where this rank holds no gradient of ``p``). Laid out by ``params``, the same list on every rank, so every
    rank joins the same collective."""
    local = torch.zeros(len(params), k, dtype=torch.float64, device=shards.device)
    by_id = {id(p): v for p, v in pairs.items()}
    for i, p in enumerate(params):
        for j, (a, b) in enumerate(by_id.get(id(p), [])):
            local[i, j] = (a.double() * b.double()).sum()
    return {id(p): row for p, row in zip(params, shards.sum_(local))}
