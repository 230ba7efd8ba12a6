"""Normalizations affine in their weight along the last dims: y = c(x) + xhat(x) * w + b. ``nn.LayerNorm`` (with or
without bias) and ``nn.RMSNorm`` directly; any other ``*Norm`` module with a ``weight`` of the normalized shape
(transformers' Llama/Mistral/Qwen2/T5 RMSNorm, Gemma's x (1 + w)) once a probe has verified that form on random
inputs and weights. Instance i's gradients are Full terms: sum_t b_it * xhat_it and sum_t b_it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .base import Call, Kind, UnsupportedModuleError, cat_tokens, group_sum, per_instance, wide
from .terms import Full, Term

BATCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)
# normalizations over other axes than a token's features: not this kind (a trainable one is refused by name)
_OTHER_AXES = (
    *BATCH_NORMS,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)


class NormKind(Kind):
    label = "LayerNorm/RMSNorm"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        if type(module).forward in (nn.LayerNorm.forward, nn.RMSNorm.forward):
            return True
        weight = getattr(module, "weight", None)
        return (
            "Norm" in type(module).__name__
            and not isinstance(module, _OTHER_AXES)
            and isinstance(weight, Tensor)
            and weight.dim() >= 1
        )

    def check(self) -> None:
        mod = self.module
        weight = self._weight()
        self.shape = tuple(getattr(mod, "normalized_shape", None) or weight.shape)
        if type(mod).forward in (nn.LayerNorm.forward, nn.RMSNorm.forward):
            return
        bias = getattr(mod, "bias", None)
        if isinstance(bias, Tensor) and bias.shape != weight.shape:
            raise UnsupportedModuleError(f"{self.name}: bias shape {tuple(bias.shape)} is not the weight's.")
        gen = torch.Generator().manual_seed(0)

        def rand(*shape: int) -> Tensor:
            return torch.randn(shape, generator=gen, dtype=torch.float64).to(weight.device, weight.dtype)

        x, w = rand(2, 3, *self.shape), rand(*self.shape)
        b = rand(*self.shape) if isinstance(bias, Tensor) else None
        tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 3e-2
        try:
            with torch.no_grad():
                c, xhat = self._parts(x)
                got = self._call(x, w, b)
                want = c + xhat * w + (b if b is not None else 0.0)
                row = self._call(x[:1], w, b)
                ok = (
                    got.shape == x.shape
                    and torch.allclose(got.double(), want.double(), rtol=tol, atol=tol)
                    and torch.allclose(row.double(), got[:1].double(), rtol=tol, atol=tol)
                )
        except Exception as err:
            ok, why = False, f" ({type(err).__name__}: {err})"
        else:
            why = ""
        if not ok:
            raise self.refusal(
                "is not a per-token normalization affine in its weight (c(x) + xhat(x) * weight + bias)"
                f"{why}: its per-instance gradients cannot be read"
            )

    def _weight(self) -> Tensor:
        weight = getattr(self.module, "weight", None)
        assert isinstance(weight, Tensor)
        return weight

    def _call(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        self.busy = True
        try:
            return functional_call(self.module, params, (x,))
        finally:
            self.busy = False

    def _parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(c(x), xhat(x)) at the module's precision: c is the output at w = 0 (and b = 0), xhat its slope in w."""
        mod = self.module
        if type(mod).forward is nn.LayerNorm.forward:
            return torch.zeros((), dtype=x.dtype, device=x.device), F.layer_norm(x, self.shape, eps=mod.eps)  # type: ignore[arg-type]
        if type(mod).forward is nn.RMSNorm.forward:
            return torch.zeros((), dtype=x.dtype, device=x.device), F.rms_norm(x, self.shape, eps=mod.eps)  # type: ignore[arg-type]
        weight = self._weight()
        bias = getattr(mod, "bias", None)
        zero = torch.zeros_like(weight)
        b0 = torch.zeros_like(bias) if isinstance(bias, Tensor) else None
        c = self._call(x, zero, b0)
        return c, self._call(x, torch.ones_like(weight), b0) - c

    def terms(self, calls: list[Call], bsz: int, m: int, dense: bool) -> list[tuple[Tensor, Term]]:
        feat = int(torch.Size(self.shape).numel())
        b = cat_tokens([wide(c.grad).reshape(bsz, -1, feat) for c in calls], dim=1)
        out: list[tuple[Tensor, Term]] = []
        weight, bias = self.params.get("weight"), self.params.get("bias")
        if weight is not None:
            with torch.no_grad():
                own = type(self.module).forward in (nn.LayerNorm.forward, nn.RMSNorm.forward)  # widen before, not after
                xhat = cat_tokens(
                    [wide(self._parts(wide(c.x) if own else c.x)[1]).reshape(bsz, -1, feat) for c in calls], 1
                )
            out.append((weight, group_sum(xhat * b, bsz, m)))
        if bias is not None:
            out.append((bias, group_sum(b, bsz, m)))
        return out

    def correct(self, x: Tensor, out: Tensor, eps: dict[int, list[Term]], bsz: int, m: int, cache: dict) -> Tensor:
        feat = int(torch.Size(self.shape).numel())
        y = out.reshape(bsz, -1, feat)
        weight, bias = self.params.get("weight"), self.params.get("bias")
        if weight is not None and eps.get(id(weight)):
            xhat = self._parts(x)[1].reshape(bsz, -1, feat)
            for term in eps[id(weight)]:
                assert isinstance(term, Full)
                y = torch.addcmul(y, xhat, per_instance(term.value, bsz, m).to(y.dtype))
        if bias is not None:
            for term in eps.get(id(bias), []):
                assert isinstance(term, Full)
                y = y + per_instance(term.value, bsz, m).to(y.dtype)
        return y.reshape(out.shape)
