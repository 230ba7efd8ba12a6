"""2-D convolutions (``nn.Conv2d``, ``groups=1``, zero padding: ViT patch embeddings, ResNet-style 3x3 layers). The
input's patches (``F.unfold``) make it a Linear over output positions: instance i's weight gradient is
sum_l b_il (x) patch_il, a :class:`~.terms.LowRank` term over the [out, in kh kw] view of the kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, Kind, cat_tokens, grouped, per_instance, ungrouped, wide
from .terms import Full, LowRank, Term, matmul_delta


class Conv2dKind(Kind):
    label = "Conv2d"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return type(module).forward is nn.Conv2d.forward

    def check(self) -> None:
        mod = self.module
        assert isinstance(mod, nn.Conv2d)
        if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            raise self.refusal(
                f"has groups={mod.groups}, padding_mode={mod.padding_mode!r}, padding={mod.padding!r}: per-instance "
                "gradients are formed for groups=1 with numeric zero padding only"
            )

    def _patches(self, x: Tensor) -> Tensor:
        """[B, L, in kh kw]: every output position's input patch."""
        mod = self.module
        assert isinstance(mod, nn.Conv2d)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # type: ignore[arg-type]
        return cols.transpose(1, 2)

    def terms(self, calls: list[Call], bsz: int, m: int, dense: bool) -> list[tuple[Tensor, Term]]:
        a = cat_tokens([wide(self._patches(c.x)) for c in calls], dim=1)
        b = cat_tokens([wide(c.grad).reshape(bsz, c.grad.shape[1], -1).transpose(1, 2) for c in calls], dim=1)
        a, b = grouped(a, bsz, m), grouped(b, bsz, m).contiguous()
        out: list[tuple[Tensor, Term]] = []
        weight, bias = self.params.get("weight"), self.params.get("bias")
        if weight is not None:
            n, d_in, d_out = a.shape[1], a.shape[2], b.shape[2]
            if dense and n * (d_in + d_out) > d_in * d_out:
                out.append((weight, Full(torch.bmm(b.transpose(1, 2), a))))
            else:
                out.append((weight, LowRank(b, a)))
        if bias is not None:
            out.append((bias, Full(b.sum(1, keepdim=True))))
        return out

    def correct(self, x: Tensor, out: Tensor, eps: dict[int, list[Term]], bsz: int, m: int, cache: dict) -> Tensor:
        channels = out.shape[-3]
        y = out.reshape(bsz, channels, -1).transpose(1, 2)  # [B, L, out]
        positions = y.shape[1]
        weight, bias = self.params.get("weight"), self.params.get("bias")
        if weight is not None and eps.get(id(weight)):
            xs = grouped(self._patches(x), bsz, m)
            for term in eps[id(weight)]:
                dtype = term.value.dtype if isinstance(term, Full) else term.right.dtype
                y = y + ungrouped(matmul_delta(term, xs.to(dtype), 1, cache), bsz, m, positions).to(y.dtype)
        if bias is not None:
            for term in eps.get(id(bias), []):
                assert isinstance(term, Full)
                y = y + per_instance(term.value, bsz, m).to(y.dtype)
        return y.transpose(1, 2).reshape(out.shape)
