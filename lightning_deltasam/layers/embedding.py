"""Embeddings: ``nn.Embedding`` and subclasses whose forward is verified to be a lookup times a constant (Gemma's
scaled word embedding, x sqrt(d)). Instance i's gradient touches only the rows of its tokens: a
:class:`~.terms.Rows` term, never B x V x d. ``padding_idx`` rows get no gradient, as in autograd."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from .base import Call, Kind, UnsupportedModuleError, cat_tokens, grouped, ungrouped, wide
from .terms import Rows, Term, lookup_delta


class EmbeddingKind(Kind):
    label = "Embedding"
    roles = ("weight",)

    def __init__(self, name: str, module: nn.Module, params: dict[str, Tensor]) -> None:
        super().__init__(name, module, params)
        self.scale = 1.0  # out = scale * W[x]
        self.computed = False  # the forward computes its own indices (OPT/BART/BioGPT positions): read them inside

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def check(self) -> None:
        mod = self.module
        assert isinstance(mod, nn.Embedding)
        for option, value, why in (
            ("scale_grad_by_freq", mod.scale_grad_by_freq, "it divides by counts over the whole batch"),
            ("max_norm", mod.max_norm, "it renormalizes rows in place during the forward"),
        ):
            if value:
                raise UnsupportedModuleError(
                    f"{self.name} (Embedding) has {option}={value!r}: {why}, so no instance has a gradient of its own. "
                    f"Construct it with {option}={False if option == 'scale_grad_by_freq' else None}, or freeze "
                    f"{self.name}.weight (requires_grad=False)."
                )
        if type(mod).forward is not nn.Embedding.forward:
            try:
                self.scale = self._probe_scale(mod)
            except UnsupportedModuleError:
                self.computed = True  # checked at every call instead: out must be W[the indices it looked up]

    def register(self, hook: Callable[[nn.Module, tuple, Tensor], Tensor | None]) -> list[RemovableHandle]:
        """For a forward that computes its own indices, the indices F.embedding receives on the module's weight
        (read by a torch-function mode while that forward runs) are the call's input."""
        if not self.computed:
            return super().register(hook)
        mod = self.module
        assert isinstance(mod, nn.Embedding)
        seen: list[Tensor] = []
        mode = _Lookups(mod.weight, seen)

        def enter(module: nn.Module, inputs: tuple) -> None:
            seen.clear()
            mode.__enter__()

        def leave(module: nn.Module, inputs: tuple, out: Tensor) -> Tensor | None:
            mode.__exit__(None, None, None)
            if self.busy:
                return None
            if len(seen) != 1 or not isinstance(out, Tensor) or out.shape != (*seen[0].shape, mod.embedding_dim):
                raise UnsupportedModuleError(self._not_a_lookup(f"{len(seen)} lookups of its weight"))
            with torch.no_grad():
                if not torch.equal(out, F.embedding(seen[0], mod.weight)):
                    raise UnsupportedModuleError(self._not_a_lookup("its output is not the rows it looked up"))
            return hook(module, (seen[0],), out)

        return [mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave)]

    def _not_a_lookup(self, why: str) -> str:
        return (
            f"{self.name} ({type(self.module).__name__}) overrides Embedding.forward and is not a lookup of its first "
            f"argument times a constant, nor of indices it computes ({why}): its per-instance gradients cannot be "
            f"read. Freeze {self.name}.weight (requires_grad=False), or use a plain nn.Embedding."
        )

    def _probe_scale(self, mod: nn.Embedding) -> float:
        """The constant c with forward(x) == c W[x], checked on random indices and two weights; else a refusal."""
        gen = torch.Generator().manual_seed(0)
        weight = mod.weight
        idx = torch.randint(mod.num_embeddings, (2, 3), generator=gen).to(weight.device)
        other = torch.randn(weight.shape, generator=gen, dtype=torch.float64).to(weight.device, weight.dtype)
        tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 2e-2
        scale = None
        try:
            with torch.no_grad():
                for w in (weight, other):
                    out = functional_call(mod, {"weight": w}, (idx,))
                    ref = F.embedding(idx, w)
                    if not isinstance(out, Tensor) or out.shape != ref.shape:
                        raise ValueError("not a lookup")
                    if scale is None:
                        scale = float((out.double() * ref.double()).sum() / ref.double().square().sum())
                    if not torch.allclose(
                        out.double(), scale * ref.double(), rtol=tol, atol=tol * float(ref.abs().max())
                    ):
                        raise ValueError("not a lookup")
        except Exception as err:  # any failure: the forward is not a plain (scaled) lookup of its first argument
            raise UnsupportedModuleError(self._not_a_lookup(f"{type(err).__name__}: {err}")) from None
        assert scale is not None
        return scale

    def terms(self, calls: list[Call], bsz: int, m: int, dense: bool) -> list[tuple[Tensor, Term]]:
        weight = self.params["weight"]
        mod = self.module
        assert isinstance(mod, nn.Embedding)
        idx = cat_tokens([c.x.reshape(bsz, -1) for c in calls], dim=1)
        b = cat_tokens([wide(c.grad).reshape(bsz, -1, mod.embedding_dim) for c in calls], dim=1)
        if mod.padding_idx is not None:
            b = b.masked_fill((idx == mod.padding_idx).unsqueeze(-1), 0.0)
        if self.scale != 1.0:
            b = b * self.scale
        return [(weight, Rows(grouped(idx, bsz, m), grouped(b, bsz, m), mod.num_embeddings))]

    def correct(self, x: Tensor, out: Tensor, eps: dict[int, list[Term]], bsz: int, m: int, cache: dict) -> Tensor:
        tokens = x[0].numel()
        y = out.reshape(bsz, tokens, out.shape[-1])
        idx = grouped(x.reshape(bsz, tokens), bsz, m)
        for term in eps.get(id(self.params["weight"]), []):
            delta = lookup_delta(term, idx)
            y = y + (ungrouped(delta, bsz, m, tokens) * self.scale).to(y.dtype)
        return y.reshape(out.shape)


class _Lookups(TorchFunctionMode):
    """Keeps the indices of every ``F.embedding`` call on ``weight`` while active."""

    def __init__(self, weight: Tensor, seen: list[Tensor]) -> None:
        super().__init__()
        self.weight, self.seen = weight, seen

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.embedding and len(args) > 1 and args[1] is self.weight:
            self.seen.append(args[0])
        return func(*args, **kwargs)
