"""Linear layers: ``nn.Linear`` (y = x W^T + b) and transformers' ``Conv1D`` (y = x W + b, GPT-2's), any leading
dims. Instance i's weight gradient is sum_t b_it (x) a_it over its tokens: a :class:`~.terms.LowRank` term, or the
dense [out, in] matrix per group when that costs fewer FLOPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .base import Call, Kind, cat_tokens, grouped, per_instance, ungrouped, wide
from .terms import Full, LowRank, Term, matmul_delta


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (a Linear with its weight stored [in, out]), recognised by its class and forward."""
    forward = getattr(type(module), "forward", None)
    return (
        type(module).__name__ == "Conv1D"
        and type(module).__module__.startswith("transformers.")
        and getattr(forward, "__qualname__", "") == "Conv1D.forward"
        and hasattr(module, "nf")
    )


class LinearKind(Kind):
    label = "Linear"

    def __init__(self, name: str, module: nn.Module, params: dict[str, Tensor]) -> None:
        super().__init__(name, module, params)
        self.contract = 0 if _is_conv1d(module) else 1  # which side of W the input meets

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or _is_conv1d(module)

    def check(self) -> None:
        """A Linear subclass with its own forward (Falcon's) is taken once it is verified to be F.linear."""
        mod = self.module
        if not isinstance(mod, nn.Linear) or type(mod).forward is nn.Linear.forward:
            return
        gen = torch.Generator().manual_seed(0)
        w = mod.weight

        def rand(*shape: int) -> Tensor:
            return torch.randn(shape, generator=gen, dtype=torch.float64).to(w.device, w.dtype)

        x, weight = rand(2, 3, mod.in_features), rand(*w.shape)
        params = {"weight": weight}
        if isinstance(mod.bias, Tensor):
            params["bias"] = rand(*mod.bias.shape)
        tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 3e-2
        self.busy = True
        try:
            with torch.no_grad():
                got = functional_call(mod, params, (x,))
            ok = isinstance(got, Tensor) and torch.allclose(
                got.double(), F.linear(x, weight, params.get("bias")).double(), rtol=tol, atol=tol
            )
        except Exception:
            ok = False
        finally:
            self.busy = False
        if not ok:
            raise self.refusal(
                "overrides Linear.forward and is not F.linear(x, weight, bias): its per-instance gradients cannot be read"
            )

    def terms(self, calls: list[Call], bsz: int, m: int, dense: bool) -> list[tuple[Tensor, Term]]:
        a = cat_tokens([wide(c.x).reshape(bsz, -1, c.x.shape[-1]) for c in calls], dim=1)
        b = cat_tokens([wide(c.grad).reshape(bsz, -1, c.grad.shape[-1]) for c in calls], dim=1)
        a, b = grouped(a, bsz, m), grouped(b, bsz, m).contiguous()
        out: list[tuple[Tensor, Term]] = []
        weight, bias = self.params.get("weight"), self.params.get("bias")
        if weight is not None:
            left, right = (b, a) if self.contract == 1 else (a, b)
            n, d_in, d_out = a.shape[1], a.shape[2], b.shape[2]
            if dense and n * (d_in + d_out) > d_in * d_out:  # the dense G_g costs fewer FLOPs
                out.append((weight, Full(torch.bmm(left.transpose(1, 2), right))))
            else:
                out.append((weight, LowRank(left, right, grad_left=self.contract == 1)))
        if bias is not None:
            out.append((bias, Full(b.sum(1, keepdim=True))))
        return out

    def correct(self, x: Tensor, out: Tensor, eps: dict[int, list[Term]], bsz: int, m: int, cache: dict) -> Tensor:
        tokens = out[0].numel() // out.shape[-1]
        y = out.reshape(bsz, tokens, out.shape[-1])
        xs = grouped(x.reshape(bsz, tokens, x.shape[-1]), bsz, m)
        delta: Tensor | None = None
        weight, bias = self.params.get("weight"), self.params.get("bias")
        if weight is not None:
            for term in eps.get(id(weight), []):
                d = matmul_delta(term, xs.to(_dtype(term)), self.contract, cache)
                delta = d if delta is None else delta + d
        if delta is not None:
            y = y + ungrouped(delta, bsz, m, tokens).to(y.dtype)
        if bias is not None:
            for term in eps.get(id(bias), []):
                assert isinstance(term, Full)
                y = y + per_instance(term.value, bsz, m).to(y.dtype)
        return y.reshape(out.shape)


def _dtype(term: Term) -> torch.dtype:
    return term.value.dtype if isinstance(term, Full) else term.right.dtype
